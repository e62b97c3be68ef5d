"""The one error type of the transfer data readers."""


class DataError(ValueError):
    """A problem in the user's data files, reported as one line naming the file at fault
    (the CLI turns it into exit status 2 without a traceback)."""
