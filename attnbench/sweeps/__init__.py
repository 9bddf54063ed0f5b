"""The sweeps, one module per kind (``kernel`` with its decode mode, ``accuracy``, ``resolution``) on
one shared sweep-folder base (``base``); an accuracy sweep's points (``points``), where they run
(``launchers``), and their tuning grid (``tuning``)."""
