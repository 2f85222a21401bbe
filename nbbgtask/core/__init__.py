"""Plain values, errors and checks that know nothing of the rest: the task states, the exceptions,
the task record, validation of what users pass, configuration, the home folder's trust rules,
limits as values, process identity, byte framing between processes, the one at-fork reset, and
the text renderings of a task shared by the widgets, the magic and the command line.

May import: nothing of nbbgtask outside ``core``.
"""
