"""The records and files of the home folder: the `Store` (task records in TinyDB files), its
storage, file locks and per-shard summaries; where a task's log, result, outputs and stack files
are, and reading them back (the outputs file, the tail under a bar).

May import: ``core``.
"""
