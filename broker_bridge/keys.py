"""API keys and their names: who an admin request came from (``invokedBy``). Pure: no I/O."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping


def fingerprint(key: str) -> str:
    """A key's stable public handle: it names the key without revealing it."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def names(named: Iterable[tuple[str, str]]) -> dict[str, str]:
    """(name, key) pairs as a map from each key's fingerprint to its name."""
    return {fingerprint(key): name for name, key in named}


def matching(candidate: str, keys: tuple[str, ...]) -> str | None:
    """The configured key ``candidate`` equals, or None: compared with every key in constant time,
    so timing tells nothing about near misses."""
    found = None
    for key in keys:
        if hmac.compare_digest(candidate.encode(), key.encode()):
            found = key
    return found


def name_by_print(key_print: str, key_names: Mapping[str, str]) -> str:
    """A key's name, by its fingerprint; a key configured as a plain string (or generated) is
    ``key-`` and the start of its fingerprint."""
    return key_names.get(key_print) or f"key-{key_print[:8]}"


def name_of(key: str, key_names: Mapping[str, str]) -> str:
    return name_by_print(fingerprint(key), key_names)
