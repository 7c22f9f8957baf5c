"""One exception type for mistakes a user can fix; entry points print its message as a single line."""


class CovipalError(ValueError):
    """Bad input or configuration. The message is one line that names the bad value and the fix."""
