"""Errors the user can fix: the harness prints them as one line, never as a traceback."""


class UserError(Exception):
    """Bad input (config, data path, unreachable hub). The message names the fix."""
