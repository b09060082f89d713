"""Small range checks that raise :class:`InvalidParameterError` naming the field and the allowed range."""

from __future__ import annotations

import math
from typing import Any

from pdserve.common.errors import ConfigError, InvalidParameterError


class ValidatedConfig:
    """Base of a frozen config dataclass checked once, when it is built: ``_validate`` raises
    :class:`InvalidParameterError` for a bad field, which reaches the caller as a :class:`ConfigError`
    naming that field."""

    def __post_init__(self) -> None:
        try:
            self._validate()
        except InvalidParameterError as exc:
            raise ConfigError(exc.field, exc.message) from None

    def _validate(self) -> None:
        raise NotImplementedError


def require_int(field: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(field, f"must be an integer, got {value!r}")
    _check_range(field, value, minimum, maximum)
    return value


def require_float(
    field: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameterError(field, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameterError(field, f"must be finite, got {value}")
    if exclusive_minimum and minimum is not None and value <= minimum:
        high = "" if maximum is None else f" and <= {maximum}"
        raise InvalidParameterError(field, f"must be > {minimum}{high}, got {value}")
    _check_range(field, value, None if exclusive_minimum else minimum, maximum)
    return value


def _check_range(field: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and maximum is not None and not (minimum <= value <= maximum):
        raise InvalidParameterError(field, f"must be in [{minimum}, {maximum}], got {value}")
    if minimum is not None and value < minimum:
        raise InvalidParameterError(field, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidParameterError(field, f"must be <= {maximum}, got {value}")


def require_text(field: str, value: Any, *, max_chars: int | None = None) -> str:
    """A ``str`` that can travel as UTF-8 (no lone surrogate) and, with ``max_chars``, is no longer
    than that; else :class:`InvalidParameterError` naming ``field``."""
    if not isinstance(value, str):
        raise InvalidParameterError(field, f"must be a string, got {type(value).__name__}")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidParameterError(field, f"is {len(value)} characters long, more than the {max_chars} allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameterError(field, f"is not valid UTF-8 text: it holds a lone surrogate at character "
                                           f"{exc.start}") from None
    return value
