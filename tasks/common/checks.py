"""Checks of a task's settings and data, raised before any data is read or training starts, naming what fixes them."""
from __future__ import annotations


def require_positive(prefix: str, **values: int | None) -> None:
    """Every given value (``None``: unset) must be > 0, e.g. ``require_positive("task.data", batch_size=0)``."""
    bad = [f"{prefix}.{key}={value}" for key, value in values.items() if value is not None and value <= 0]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be positive")


def first_of(items: list, shown: int = 5, sep: str = ", ") -> str:
    """The first ``shown`` items joined by ``sep``, then how many more: an error stays readable for any count."""
    more = f"{sep}and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(map(str, items[:shown])) + more
