"""Results on disk and what stands on them: tables written atomically and read with one-line errors
(``tables``), each kind of table's layout by version and the upgrade of older ones (``schema``), the
aggregate over seeds (``aggregate``), what a folder holds (``discover``), and a training run's record
for ``--resume`` (``run_record``)."""
