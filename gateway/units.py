"""Durations (``20s``, ``200ms``, ``1.5s``, ``2m``, ``30d``, or seconds) and sizes (``4MiB``) as users write them in
the config, the retry schedule configured durations imply, and times as the protocol writes them (RFC 3339).

Its own module because :mod:`gateway.config`, :mod:`gateway.workflows` and (through the config)
:mod:`policies` use it, and the config holds the workflows.
"""

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

__all__ = ["Duration", "Size", "retry_delay", "rfc3339"]

_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _parse_duration(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 20s or 200ms, got {value!r}")
    if not isinstance(value, str):
        return value  # a number of seconds; pydantic checks it is one
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"expected a duration like 20s or 200ms, got {value!r}")
    return float(match[1]) * _UNIT_SECONDS[match[2] or "s"]


Duration = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0, allow_inf_nan=False)]
"""Seconds, written as a number or as ``20s``, ``200ms``, ``1.5s``, ``2m``, ``24h``, ``30d``."""


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?", re.IGNORECASE)
_UNIT_BYTES = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}


def _parse_size(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 4MiB or 512KB, got {value!r}")
    if not isinstance(value, str):
        return value  # a number of bytes; pydantic checks it is one
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"expected a size like 4MiB or 512KB, got {value!r}")
    return int(float(match[1]) * _UNIT_BYTES[(match[2] or "b").lower()])


Size = Annotated[int, BeforeValidator(_parse_size), Field(gt=0)]
"""Bytes, written as a number or as ``4MiB``, ``512KB``, ``1GB``."""


def retry_delay(attempt: int, backoff: float, max_backoff: float, jitter: float, random: float) -> float:
    """Seconds to wait before try ``attempt + 1``: ``backoff`` doubled per try up to ``max_backoff``, spread
    by ± ``jitter`` with ``random`` in [0, 1). One schedule for workflow steps and server retries."""
    base = min(max_backoff, backoff * 2.0 ** min(attempt - 1, 64))  # the cap keeps 2**n a float
    return max(0.0, base * (1 + jitter * (2 * random - 1)))


def rfc3339(seconds: float) -> str:
    """Wall-clock ``seconds`` since the epoch as RFC 3339 (ISO 8601) UTC, to the millisecond: ``…T08:30:00.000Z``."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
