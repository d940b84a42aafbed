"""The error a user's data can cause: `FormatError` names the file, key or value and what to do.

Every subclass keeps the one-message constructor, so an error raised in a DataLoader worker (which
re-creates it as ``type(err)(message)``) or in a Ray actor (which pickles it) arrives as the same type
with the same message.
"""

from __future__ import annotations


class FormatError(Exception):
    """A data problem a user can cause (misaligned shards, corrupt member, bad key); names file and key."""


def printable(text: str) -> str:
    """`text` safe to print on one line: control characters, undecodable bytes and lone surrogates escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def shown(value: object, limit: int = 80) -> str:
    """repr(value) for an error message: printable, and cut to `limit` characters (data can be huge)."""
    text = printable(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
