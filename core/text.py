"""Text and data made storable and encodable once, where they enter the engine.

Handlers and clients hand us strings we do not control: error texts built from file names that are not
UTF-8 (``os.listdir`` gives lone surrogates for those), progress messages with NUL or terminal escapes,
results nested ten thousand deep or holding ``NaN``. Any of them, written as is, makes the UTF-8 encoder,
the JSON encoder or PostgreSQL fail — and a failing write in a batch takes the whole batch down.

So every such value passes through here at the boundary (the job context, the worker's outcome, the
service's tracked-job and submit entry points, the HTTP body parser):

* a lone surrogate becomes U+FFFD (the Unicode replacement character);
* in one-line texts (names, messages, errors, log lines) control characters become U+FFFD, except that
  tab, newline and carriage return become spaces in names and stay in multi-line texts; NUL always goes
  (PostgreSQL refuses it in text);
* texts longer than their limit are clipped, with a visible marker saying how much was cut;
* data (results, checkpoints, payloads) keeps its shape: strings and keys are cleaned of surrogates and
  NUL, non-finite numbers become strings (``"NaN"``), anything deeper than :data:`MAX_DEPTH` or of a type
  JSON cannot hold becomes a readable string, and a result larger than :data:`MAX_RESULT_BYTES` is
  replaced by a clipped preview.

The limits (characters) are part of the documented interface (README "Limits").
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: Job and batch names, stage names.
MAX_NAME = 300
#: Progress messages and activity-log lines.
MAX_MESSAGE = 2000
#: Error texts of failed jobs.
MAX_ERROR = 2000
#: Nesting depth of results, checkpoints and payloads.
MAX_DEPTH = 64
#: A result larger than this as JSON is replaced by a clipped preview.
MAX_RESULT_BYTES = 256 * 1024
#: Progress numbers beyond ±this (and NaN, infinities) are taken as unknown: SQLite cannot bind an int past
#: 2**63, and a NaN is not JSON.
MAX_PROGRESS_NUMBER = 1e18

REPLACEMENT = "\ufffd"
_MAX_INT = 10**300

# Lone surrogates: what surrogateescape decoding and JSON "\udcff" escapes produce.
_SURROGATE = re.compile("[\ud800-\udfff]")
# What may not appear in a stored text: surrogates, NUL, and (for one-line texts) other C0/C1 controls.
_BAD_MULTILINE = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BAD_ONELINE = re.compile("[\ud800-\udfff\x00-\x1f\x7f-\x9f]")
_WHITESPACE_CONTROLS = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


def _replace_bad(match: re.Match[str]) -> str:
    return "" if match.group() == "\x00" else REPLACEMENT


def fix_surrogates(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (everything else kept)."""
    return _SURROGATE.sub(REPLACEMENT, text) if _SURROGATE.search(text) else text


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ending in a marker that says how much was cut."""
    if len(text) <= limit:
        return text
    keep = limit
    for _ in range(3):  # the marker's length depends on the count it shows; this settles in two rounds
        keep = max(0, limit - len(f"… [{len(text) - keep} more characters clipped]"))
    return text[:keep] + f"… [{len(text) - keep} more characters clipped]"


def clean_text(text: Any, limit: int = MAX_MESSAGE, *, multiline: bool = True) -> str:
    """A storable, encodable display text: surrogates and control characters replaced, clipped to ``limit``.

    ``multiline`` keeps newlines and tabs (messages, errors); without it they become spaces (names).
    Non-strings are converted with ``str()`` first.
    """
    # The common case, cheaply (progress reports call this many times a second): nothing to change.
    # (isprintable() is False for surrogates and every control character, newlines included.)
    if type(text) is str and len(text) <= limit and text.isprintable():
        return text
    if not isinstance(text, str):
        text = str(text)
    if not multiline:
        text = text.translate(_WHITESPACE_CONTROLS)
    bad = _BAD_MULTILINE if multiline else _BAD_ONELINE
    if bad.search(text):
        text = bad.sub(_replace_bad, text)
    return clip(text, limit)


def clean_optional(text: Any, limit: int = MAX_MESSAGE, *, multiline: bool = True) -> str | None:
    """:func:`clean_text`, passing None through."""
    return None if text is None else clean_text(text, limit, multiline=multiline)


def clean_name(text: Any) -> str | None:
    """A one-line name (job, batch, stage), at most :data:`MAX_NAME` characters; None stays None."""
    return clean_optional(text, MAX_NAME, multiline=False)


def _clean_str(s: str) -> str:
    if _SURROGATE.search(s) or "\x00" in s:
        s = _SURROGATE.sub(REPLACEMENT, s).replace("\x00", "")
    return s


def clean_json(value: Any, *, max_depth: int = MAX_DEPTH) -> Any:
    """``value`` as data JSON and every database can hold, with its shape kept where possible.

    Strings and keys lose surrogates (-> U+FFFD) and NUL; ``NaN``/``Infinity`` become strings; tuples and
    sets become lists; pydantic models are dumped; other objects become their ``repr``; anything nested
    deeper than ``max_depth`` becomes the string ``"… [nested too deep]"``.
    """
    return _clean(value, max_depth)


def _clean(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, int):
        # Beyond this, str() and JSON refuse the number (4,300 digits) or no reader can use it.
        return value if -_MAX_INT < value < _MAX_INT else "… [integer too large]"
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if depth <= 0:
        return "… [nested too deep]"
    if isinstance(value, dict):
        return {_clean_str(str(k)): _clean(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v, depth - 1) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            return _clean(dump(mode="json"), depth)
        except Exception:
            pass
    try:
        return _clean_str(repr(value))[:MAX_MESSAGE]
    except Exception:
        return f"<{type(value).__name__}>"


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests lists and objects deeper than ``limit`` levels.

    Iterative, so that a hostile document cannot make the check itself overflow the stack.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def storable_number(value: Any) -> Any:
    """``value`` if it is a number the database can hold (finite, within ±:data:`MAX_PROGRESS_NUMBER`),
    else None (unknown)."""
    try:
        return value if -MAX_PROGRESS_NUMBER < value < MAX_PROGRESS_NUMBER else None
    except TypeError:  # None, or not a number at all
        return None


def clean_result(value: Any) -> Any:
    """A handler's or client's result, cleaned (:func:`clean_json`) and at most :data:`MAX_RESULT_BYTES`.

    A larger result is replaced by ``{"clipped": true, "bytes": N, "preview": "<start of its JSON>"}``, so a
    reader sees both that it was clipped and what it began with.
    """
    if value is None:
        return None  # most handlers return nothing: no JSON to clean or measure
    data = clean_json(value)
    encoded = json.dumps(data, ensure_ascii=False)
    size = len(encoded.encode())
    if size <= MAX_RESULT_BYTES:
        return data
    return {"clipped": True, "bytes": size, "preview": clip(encoded, 2000)}


def safe_json_bytes(data: Any) -> bytes:
    """``data`` as compact UTF-8 JSON that never fails to encode.

    The last line of defence for replies and streams: values read back from an old database may still hold
    lone surrogates, and a stray object (a datetime) must not turn a reply into a 500.
    """
    try:
        # allow_nan=False: a bare NaN token is not JSON, and browsers' JSON.parse refuses the whole event.
        text = json.dumps(data, default=str, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        text = json.dumps(clean_json(data), default=str, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return fix_surrogates(text).encode()


__all__ = [
    "MAX_DEPTH",
    "MAX_ERROR",
    "MAX_MESSAGE",
    "MAX_NAME",
    "MAX_RESULT_BYTES",
    "clean_json",
    "clean_name",
    "clean_optional",
    "clean_result",
    "clean_text",
    "clip",
    "fix_surrogates",
    "json_depth_exceeds",
    "safe_json_bytes",
    "storable_number",
]
