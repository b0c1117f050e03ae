"""Globs (fnmatch, case-sensitive) compiled once into one regular expression, for matching on every call."""

import re
from collections.abc import Iterable
from fnmatch import translate

__all__ = ["matcher"]


def matcher(globs: Iterable[str]) -> re.Pattern[str]:
    """One pattern whose ``fullmatch`` tells whether a name matches any of ``globs`` (none: nothing does)."""
    return re.compile("|".join(f"(?:{translate(glob)})" for glob in globs) or r"(?!)")
