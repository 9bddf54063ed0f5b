"""The sweeps, one module per kind (``kernel``, its decode mode's own code in ``decode``,
``accuracy``, ``resolution``) on one shared sweep-folder base (``base``); an accuracy sweep's points
(``points``), where they run (``launchers``), and their tuning grid (``tuning``)."""
