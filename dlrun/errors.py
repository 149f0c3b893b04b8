"""The one exception type for mistakes a user can make and fix."""


class DlrunError(Exception):
    """A user-fixable problem; the CLI prints its message and exits with code 2."""
