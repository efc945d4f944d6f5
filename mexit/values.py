"""Plain Python values from numpy and torch ones, where users hand mexit token ids and settings."""

import dataclasses
from pathlib import Path


def plain(value):
    """numpy / torch scalars and arrays (anything with `.tolist()`) as Python numbers and (nested) lists, a 0-d
    array as its number; the items of a list or tuple likewise; anything else unchanged. transformers takes such
    values wherever it takes an int or a list (token ids, max_new_tokens, eos_token_id, seeds), and so does mexit.
    Imports neither numpy nor torch (the CLI's help stays fast)."""
    if type(value) in (list, tuple):
        return type(value)(plain(v) for v in value)
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


def plain_fields(settings) -> None:
    """A frozen settings dataclass's fields through `plain`, in place (an array becomes a tuple: settings are
    hashable). Call first in `__post_init__`, so validation sees plain values."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        new = as_tuples(plain(value))
        if new is not value:
            object.__setattr__(settings, field.name, new)


class NotUTF8Error(ValueError):
    """A user's text file that is not UTF-8 (the message names the file)."""


def read_text(path, errors: str = "strict") -> str:
    """A user's text file (prompts, training text) as str: UTF-8 with or without a byte-order mark (the BOM is
    dropped, never read as U+FEFF), line ends \\r\\n and \\r read as \\n. NotUTF8Error (a ValueError) naming the file
    where it is not UTF-8 (errors="strict")."""
    try:
        with open(path, encoding="utf-8-sig", errors=errors, newline=None) as f:
            return f.read()
    except UnicodeDecodeError:
        try:  # again on the whole file, for the offset in the file (the reader's is within a chunk)
            Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise NotUTF8Error(f"{path} is not valid UTF-8 (first bad byte at offset {err.start})") from None
        raise


def as_tuples(value):
    """Lists (nested too) as tuples: hashable settings."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
