"""The one error type that means "your input is wrong", as opposed to a bug.

Raised where a stage meets bad input it cannot quarantine (an unreadable file, a config that names
nothing usable), with a message of one line naming the file, field or value. The command line
prints it as that line and exits 2; any other exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input or configuration, said in one line (a ``ValueError``: stages never retry it)."""


def unreadable(
    path: object, what: str, error: BaseException, kind: type[InputError] = InputError
) -> InputError:
    """The one line for a file that cannot be read as ``what``: its path and the first line of the
    reader's own message (Arrow's and polars' run to many lines without the file's name); ``kind``:
    the stage's own input error (``IngestError``)."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return kind(f"{path}: not a readable {what} ({first})")
