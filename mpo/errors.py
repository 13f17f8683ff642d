"""The one error type that means "your input is wrong", as opposed to a bug.

Raised where a stage meets bad input it cannot quarantine (an unreadable file, a config that names
nothing usable), with a message of one line naming the file, field or value. The command line
prints it as that line and exits 2; any other exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input or configuration, said in one line (a ``ValueError``: stages never retry it)."""
