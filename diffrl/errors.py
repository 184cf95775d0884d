"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Something the user can fix (bad name, bad file, missing weights); the message says how."""
