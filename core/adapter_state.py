"""State the chat adapters keep in the store: message bindings (which chat message shows which job or
batch) and a small key/value store (Matrix sync tokens, device ids)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, insert, or_, select, update

from .models import MessageBinding
from .storebase import StoreBase, bindings_t, in_db, kv_t


class AdapterState(StoreBase):
    """Message bindings and key/value entries, for the adapters."""

    @in_db
    def get_binding(self, platform: str, target_kind: str, target_id: int) -> MessageBinding | None:
        """The chat message bound to a job or batch on a platform, if any."""
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(bindings_t).where(
                    bindings_t.c.platform == platform,
                    bindings_t.c.target_kind == target_kind,
                    bindings_t.c.target_id == target_id,
                )
            ).first()
        return MessageBinding(**dict(row._mapping)) if row else None

    @in_db
    def find_binding_by_message(self, platform: str, message_id: str) -> MessageBinding | None:
        """The binding whose chat message id is ``message_id`` (reactions and buttons use this)."""
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(bindings_t).where(
                    bindings_t.c.platform == platform, bindings_t.c.message_id == message_id
                )
            ).first()
        return MessageBinding(**dict(row._mapping)) if row else None

    @in_db
    def save_binding(
        self,
        platform: str,
        target_kind: str,
        target_id: int,
        room: str,
        message_id: str,
        *,
        pinned: bool | None = None,
        finished: bool | None = None,
        extra: dict[str, Any] | None = None,
    ) -> MessageBinding:
        """Create or update the binding of a job or batch to a chat message."""
        now = self.db.now()
        key = and_(
            bindings_t.c.platform == platform,
            bindings_t.c.target_kind == target_kind,
            bindings_t.c.target_id == target_id,
        )
        values: dict[str, Any] = {"room": room, "message_id": message_id, "updated_at": now}
        if pinned is not None:
            values["pinned"] = pinned
        if finished is not None:
            values["finished"] = finished
        if extra is not None:
            values["extra"] = extra
        with self.db.engine.begin() as conn:
            row = conn.execute(
                update(bindings_t).where(key).values(**values).returning(*bindings_t.c)
            ).first()
            if row is None:
                values.setdefault("pinned", False)
                values.setdefault("finished", False)
                row = conn.execute(
                    insert(bindings_t)
                    .values(
                        platform=platform,
                        target_kind=target_kind,
                        target_id=target_id,
                        created_at=now,
                        **values,
                    )
                    .returning(*bindings_t.c)
                ).one()
        return MessageBinding(**dict(row._mapping))

    @in_db
    def open_bindings(self, platform: str) -> list[MessageBinding]:
        """Bindings of a platform whose message is not finished yet (pinned or still being edited)."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(bindings_t).where(
                    bindings_t.c.platform == platform,
                    or_(bindings_t.c.finished.is_(False), bindings_t.c.pinned.is_(True)),
                )
            ).all()
        return [MessageBinding(**dict(r._mapping)) for r in rows]

    # --------------------------------------------------------------------- kv

    @in_db
    def kv_get(self, key: str, default: Any = None) -> Any:
        """Read a small persistent value (adapters keep sync tokens and device ids here)."""
        with self.db.engine.connect() as conn:
            row = conn.execute(select(kv_t.c.value).where(kv_t.c.key == key)).first()
        return default if row is None else row[0]

    @in_db
    def kv_set(self, key: str, value: Any) -> None:
        """Write a small persistent value."""
        with self.db.engine.begin() as conn:
            n = conn.execute(update(kv_t).where(kv_t.c.key == key).values(value=value)).rowcount
            if not n:
                conn.execute(insert(kv_t).values(key=key, value=value))


__all__ = ["AdapterState"]
