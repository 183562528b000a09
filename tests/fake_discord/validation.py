"""Discord's size limits, enforced like Discord does: 400 with code 50035 "Invalid Form Body".

The nested ``errors`` object mirrors Discord's (``{"content": {"_errors": [...]}}``), so
discord.py's ``HTTPException.text`` shows the offending field as it would against the real API.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CONTENT_LIMIT",
    "EMBED_TOTAL_LIMIT",
    "FormError",
    "form_error_body",
    "is_empty_message",
    "validate_autocomplete",
    "validate_message",
]

CONTENT_LIMIT = 2000
MAX_EMBEDS = 10
EMBED_TOTAL_LIMIT = 6000
EMBED_TITLE = 256
EMBED_DESCRIPTION = 4096
EMBED_FIELDS = 25
FIELD_NAME = 256
FIELD_VALUE = 1024
FOOTER_TEXT = 2048
AUTHOR_NAME = 256
MAX_ACTION_ROWS = 5
MAX_ROW_ITEMS = 5
CUSTOM_ID = 100
BUTTON_LABEL = 80
MAX_CHOICES = 25
CHOICE_NAME = 100

# (path, error code, message); the path is a tuple of keys/indices into the request JSON.
FormError = tuple[tuple[str | int, ...], str, str]


def _too_long(path: tuple[str | int, ...], limit: int) -> FormError:
    return (path, "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")


def _embed_errors(embeds: list[dict[str, Any]]) -> list[FormError]:
    errors: list[FormError] = []
    if len(embeds) > MAX_EMBEDS:
        errors.append((("embeds",), "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBEDS} or fewer in length."))
    total = 0
    for i, embed in enumerate(embeds):
        title = embed.get("title") or ""
        description = embed.get("description") or ""
        footer = (embed.get("footer") or {}).get("text") or ""
        author = (embed.get("author") or {}).get("name") or ""
        fields = embed.get("fields") or []
        total += len(title) + len(description) + len(footer) + len(author)
        if len(title) > EMBED_TITLE:
            errors.append(_too_long(("embeds", i, "title"), EMBED_TITLE))
        if len(description) > EMBED_DESCRIPTION:
            errors.append(_too_long(("embeds", i, "description"), EMBED_DESCRIPTION))
        if len(footer) > FOOTER_TEXT:
            errors.append(_too_long(("embeds", i, "footer", "text"), FOOTER_TEXT))
        if len(author) > AUTHOR_NAME:
            errors.append(_too_long(("embeds", i, "author", "name"), AUTHOR_NAME))
        if len(fields) > EMBED_FIELDS:
            errors.append(_too_long(("embeds", i, "fields"), EMBED_FIELDS))
        for j, fld in enumerate(fields):
            name = str(fld.get("name") or "")
            value = str(fld.get("value") or "")
            total += len(name) + len(value)
            if len(name) > FIELD_NAME:
                errors.append(_too_long(("embeds", i, "fields", j, "name"), FIELD_NAME))
            if len(value) > FIELD_VALUE:
                errors.append(_too_long(("embeds", i, "fields", j, "value"), FIELD_VALUE))
    if total > EMBED_TOTAL_LIMIT:
        errors.append(
            (
                ("embeds",),
                "MAX_EMBED_SIZE_EXCEEDED",
                f"Embed size exceeds maximum size of {EMBED_TOTAL_LIMIT}",
            )
        )
    return errors


def _component_errors(components: list[dict[str, Any]]) -> list[FormError]:
    errors: list[FormError] = []
    rows = [c for c in components if c.get("type") == 1]
    if len(rows) > MAX_ACTION_ROWS:
        errors.append(_too_long(("components",), MAX_ACTION_ROWS))
    seen: set[str] = set()
    for i, row in enumerate(components):
        items = row.get("components", []) or []
        if row.get("type") == 1 and len(items) > MAX_ROW_ITEMS:
            errors.append(_too_long(("components", i, "components"), MAX_ROW_ITEMS))
        for j, item in enumerate(items):
            custom_id = item.get("custom_id")
            if custom_id is not None:
                if len(custom_id) > CUSTOM_ID:
                    errors.append(_too_long(("components", i, "components", j, "custom_id"), CUSTOM_ID))
                if custom_id in seen:
                    errors.append(
                        (
                            ("components", i, "components", j, "custom_id"),
                            "COMPONENT_CUSTOM_ID_DUPLICATED",
                            "Component custom id cannot be duplicated",
                        )
                    )
                seen.add(custom_id)
            label = item.get("label")
            if item.get("type") == 2 and label is not None and len(label) > BUTTON_LABEL:
                errors.append(_too_long(("components", i, "components", j, "label"), BUTTON_LABEL))
    return errors


def validate_message(payload: dict[str, Any]) -> list[FormError]:
    """Size/shape errors for a create or edit payload (only the keys present are checked)."""
    errors: list[FormError] = []
    content = payload.get("content")
    if content is not None and len(str(content)) > CONTENT_LIMIT:
        errors.append(_too_long(("content",), CONTENT_LIMIT))
    if payload.get("embeds"):
        errors.extend(_embed_errors(payload["embeds"]))
    if payload.get("components"):
        errors.extend(_component_errors(payload["components"]))
    return errors


def validate_autocomplete(data: dict[str, Any]) -> list[FormError]:
    """Errors for an autocomplete result (type 8): at most 25 choices, names <= 100 chars."""
    errors: list[FormError] = []
    choices = data.get("choices") or []
    if len(choices) > MAX_CHOICES:
        errors.append(_too_long(("data", "choices"), MAX_CHOICES))
    for i, choice in enumerate(choices):
        if len(str(choice.get("name", ""))) > CHOICE_NAME:
            errors.append(_too_long(("data", "choices", i, "name"), CHOICE_NAME))
        value = choice.get("value")
        if isinstance(value, str) and len(value) > CHOICE_NAME:
            errors.append(_too_long(("data", "choices", i, "value"), CHOICE_NAME))
    return errors


def is_empty_message(payload: dict[str, Any], *, has_files: bool = False) -> bool:
    """Discord refuses a new message with nothing in it (code 50006)."""
    return not (
        payload.get("content")
        or payload.get("embeds")
        or payload.get("components")
        or payload.get("sticker_ids")
        or payload.get("poll")
        or has_files
    )


def form_error_body(errors: list[FormError]) -> dict[str, Any]:
    """Discord's 50035 body, with errors nested along their paths."""
    tree: dict[str, Any] = {}
    for path, code, message in errors:
        node = tree
        for key in path:
            node = node.setdefault(str(key), {})
        node.setdefault("_errors", []).append({"code": code, "message": message})
    return {"code": 50035, "message": "Invalid Form Body", "errors": tree}
