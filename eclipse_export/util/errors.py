"""Errors shared across layers."""


class UserError(Exception):
    """A user's mistake (a bad flag value, an unreadable input file): the console scripts print
    it as one `error:` line and exit with status 2."""
