"""Durations as users write them in the config: ``20s``, ``200ms``, ``1.5s``, ``2m``, or a number of seconds.

Its own module because both :mod:`gateway.config` and :mod:`gateway.workflows.model` use it,
and the config holds the workflows.
"""

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

__all__ = ["Duration"]

_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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
"""Seconds, written as a number or as ``20s``, ``200ms``, ``1.5s``, ``2m``."""
