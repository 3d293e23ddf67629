"""What an object holds: every numpy array reachable from it (for tests that inspect server-side state)."""

from __future__ import annotations

import dataclasses

import numpy as np


def reachable_arrays(obj, seen: set | None = None) -> list[np.ndarray]:
    """Every numpy array reachable from an object's attributes (dicts, lists, tuples, sets, dataclasses)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in reachable_arrays(v, seen)]
    if isinstance(obj, (list, tuple, set)):
        return [a for v in obj for a in reachable_arrays(v, seen)]
    if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        return [a for v in vars(obj).values() for a in reachable_arrays(v, seen)]
    return []
