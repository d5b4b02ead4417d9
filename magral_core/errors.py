"""Named exceptions shared across modules."""

from __future__ import annotations


class MagralError(Exception):
    """Base of the project's own errors."""


class UserError(MagralError):
    """Bad input from a person or a client: the message says what was expected and what was found."""


class DataError(UserError):
    """A dataset or annotation file that cannot be read: the message names the file and the problem."""


class StoreError(MagralError):
    """Files on disk are not as expected (a missing version, a corrupt file): the message names the file."""
