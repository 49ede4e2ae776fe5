"""One exception type for problems the user can fix (bad file, bad field, bad option).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class MaskRCNNError(Exception):
    """A user-facing error: the message names the file and what is wrong with it."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what a one-line
    report of a library's error can show."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
