"""The one base class for errors a user can fix; the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix."""
