"""The one exception type users see: a one-line message naming the problem and the fix."""


class PrunewiseError(Exception):
    """A user-facing error. The message is one line: what is wrong, and how to fix it."""
