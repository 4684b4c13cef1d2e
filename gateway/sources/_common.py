"""Helpers shared by the source parsers: strict JSON, typed field access with paths, times."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.errors import NotUtf8Error, PayloadError

#: Go's zero time.Time, which Alertmanager and Grafana send as endsAt of firing alerts.
GO_ZERO_TIME_PREFIX = "0001-01-01T00:00:00"

_FRACTION = re.compile(r"(\.\d{6})\d+")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_json(body: bytes) -> Any:
    """Parse a webhook body. Integers stay Python ints (no float round trip).

    Raises NotUtf8Error for bodies that are not UTF-8 text (UTF-16/32 included: JSON
    on the wire is UTF-8; a leading UTF-8 byte order mark is ignored), PayloadError for
    empty, non-JSON, NaN/Infinity or too deeply nested bodies, saying what is wrong.
    """
    text = decode_utf8(body)
    if not text.strip():
        raise PayloadError("the body is empty; send the webhook's JSON document")
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise PayloadError(
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except ValueError as exc:
        raise PayloadError(f"the body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise PayloadError("the body's JSON is nested too deeply to be a webhook") from exc
    _reject_lone_surrogates(doc)
    return doc


def decode_utf8(body: bytes) -> str:
    """The body as text, strictly UTF-8. NUL never occurs in JSON text, but in every
    UTF-16/32 encoding of it: such bodies are refused, not guessed."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotUtf8Error(f"the body is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                           "send JSON encoded as UTF-8") from exc
    if "\x00" in text:
        raise NotUtf8Error("the body contains NUL bytes: it is not UTF-8 JSON text (UTF-16 or "
                           "UTF-32?); send JSON encoded as UTF-8")
    return text.removeprefix("\ufeff")


def _reject_lone_surrogates(doc: Any) -> None:
    """json.loads lets unpaired UTF-16 surrogates through (raw or as \\ud800 escapes);
    they cannot be hashed or echoed as UTF-8, so such a body is rejected here."""
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadError("the body contains an unpaired UTF-16 surrogate, which is not "
                           "valid Unicode text") from exc


def obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"expected a JSON object, got {_kind(value)}", path)
    return value


def get_obj(parent: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> dict[str, Any]:
    value = parent.get(key)
    if value is None and not required:
        return {}
    if value is None:
        raise PayloadError("is missing; expected a JSON object", _join(path, key))
    return obj(value, _join(path, key))


def get_list(parent: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> list[Any]:
    value = parent.get(key)
    if value is None and not required:
        return []
    if value is None:
        raise PayloadError("is missing; expected a JSON array", _join(path, key))
    if not isinstance(value, list):
        raise PayloadError(f"expected a JSON array, got {_kind(value)}", _join(path, key))
    return value


def get_str(parent: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> str | None:
    """A string field; numbers are accepted and turned into their decimal text (ids)."""
    value = parent.get(key)
    if value is None:
        if required:
            raise PayloadError("is missing; expected a string", _join(path, key))
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PayloadError(f"expected a string, got {_kind(value)}", _join(path, key))
    return str(value)


def str_map(value: Any, path: str) -> dict[str, str]:
    """A label/annotation map. Scalars are turned into text; nested values are an error."""
    if value is None:
        return {}
    mapping = obj(value, path)
    out: dict[str, str] = {}
    for k, v in mapping.items():
        if isinstance(v, str):
            out[k] = v
        elif isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, (int, float)):
            out[k] = str(v)
        elif v is None:
            out[k] = ""
        else:
            raise PayloadError(f"expected a string value, got {_kind(v)}", _join(path, k))
    return out


def parse_time(value: Any, path: str) -> datetime | None:
    """RFC 3339 time -> aware datetime; None for absent, empty or Go's zero time.

    Nanosecond fractions (Go's RFC3339Nano) are truncated to microseconds.
    A time without offset is rejected rather than guessed.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise PayloadError(f"expected an RFC 3339 time string, got {_kind(value)}", path)
    if value.startswith(GO_ZERO_TIME_PREFIX):
        return None
    text = _FRACTION.sub(r"\1", value.strip())
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise PayloadError(f"{value!r} is not an RFC 3339 time", path) from exc
    if parsed.tzinfo is None:
        raise PayloadError(f"{value!r} has no UTC offset; expected RFC 3339 with Z or +hh:mm", path)
    try:
        parsed.astimezone(UTC)
    except OverflowError as exc:
        raise PayloadError(f"{value!r} is out of the supported date range", path) from exc
    return parsed


def from_epoch_ms(value: Any, path: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"expected integer milliseconds since the epoch, got {_kind(value)}", path)
    return _epoch(value // 1000, timedelta(milliseconds=value % 1000), value, path)


def from_epoch_ns(value: Any, path: str) -> datetime | None:
    """Integer nanoseconds -> datetime using integer arithmetic only (values exceed 2**53)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"expected integer nanoseconds since the epoch, got {_kind(value)}", path)
    seconds, ns = divmod(value, 1_000_000_000)
    return _epoch(seconds, timedelta(microseconds=ns // 1000), value, path)


def _epoch(seconds: int, fraction: timedelta, value: int, path: str) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, UTC) + fraction
    except (OverflowError, OSError, ValueError) as exc:
        raise PayloadError(f"{value} is out of the supported date range", path) from exc


def iso(dt: datetime | None) -> str:
    """Canonical text of an instant for keys: UTC, microseconds."""
    if dt is None:
        return "unknown-start"
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def service_from_labels(labels: Mapping[str, str]) -> str | None:
    """The service an alert is about: the first non-empty of labels service, job, app."""
    for key in ("service", "job", "app"):
        value = labels.get(key)
        if value:
            return value
    return None


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that works for plain dicts and Starlette Headers."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in headers.items():
        if key.lower() == lowered:
            return val
    return None


def links(**urls: Any) -> dict[str, str]:
    """Keep only non-empty string URLs."""
    return {name: url for name, url in urls.items() if isinstance(url, str) and url}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
