"""The one exception type users see: its message is a single line that says what to do."""


class HublabError(Exception):
    """A user-facing failure; the CLI prints its message on one line and exits non-zero."""
