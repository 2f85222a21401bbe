"""The entry points a person types: the ``nbbgtask`` command line and the ``%bgtask`` magics, both
built from one table of commands.

May import: every layer below (``notebook`` for the magic's widgets).
"""
