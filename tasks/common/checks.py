"""Range checks of a task's settings, raised before any data is read, naming the override that fixes them."""
from __future__ import annotations


def require_positive(prefix: str, **values: int | None) -> None:
    """Every given value (``None``: unset) must be > 0, e.g. ``require_positive("task.data", batch_size=0)``."""
    bad = [f"{prefix}.{key}={value}" for key, value in values.items() if value is not None and value <= 0]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be positive")
