"""Typed errors raised by the library; the CLI turns them into clean exits."""


class MnistAnnError(Exception):
    """A problem the user can fix: bad data, a missing file, a broken store (exit 1)."""


class InvalidArgument(MnistAnnError, ValueError):
    """A value given by the caller is out of range or malformed (exit 2 on the CLI).

    It is a ValueError too, as scikit-learn and Python callers expect of a bad argument.
    """


class DataError(MnistAnnError):
    """Input data is missing, malformed or does not match what was expected."""


class IntegrityError(MnistAnnError):
    """A stored file differs from what the manifest recorded."""
