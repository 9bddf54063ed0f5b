"""Results on disk and what stands on them: tables written atomically and read with one-line errors
(``tables``), the aggregate over seeds (``aggregate``), what a folder holds (``discover``), and a
training run's record for ``--resume`` (``run_record``)."""
