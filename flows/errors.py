"""The mark of an error the user fixes: a key, a path, a file to fetch or a stage to rerun.

Its message already says what to do, so a stage's command line prints it as one
``error: ...`` line and exits with status 1 (flows/cli.py) instead of ending in a Python
traceback.
Mixed into the specific error classes, which keep their usual bases (ValueError, ...).
"""


class UserFacingError(Exception):
    """Base mark; the message names what to change."""


__all__ = ["UserFacingError"]
