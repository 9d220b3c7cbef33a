"""Text for the messages the package writes."""
from __future__ import annotations

from typing import Any, Sequence


def listed(items: Sequence[Any], limit: int) -> str:
    """``"a, b, c and 4 more"``: the first ``limit`` of ``items`` (as ``str``) and how many were
    left out (with a thousands separator)."""
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit:,} more" if len(items) > limit else "")
