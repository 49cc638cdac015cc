"""The one error class a user can cause; the CLI prints its message without a traceback."""

from __future__ import annotations


class EdgeoptError(Exception):
    """A problem with the user's input or request. The message says what to do about it."""
