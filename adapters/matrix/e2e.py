"""End-to-end encryption for the Matrix adapter: key store, trust, encrypted sends, undecryptable events.

matrix-nio does the cryptography (Olm/Megolm through vodozemac); this module decides *where the keys
live*, *whom the bot trusts* and *what happens around a send or a sync* in an encrypted room. The send hook
lives in the Matrix transport (:meth:`adapters.matrix.transport.MatrixTransport.send`, behind the
account's outbox and the progress driver); the login and sync hooks (marked ``E2E hook``) in
``adapter.py``:

* :meth:`MatrixE2E.prepare_client` -> the nio client gets a store directory and encryption enabled;
* :meth:`MatrixE2E.can_resume` -> a stored access token is reused only for the device whose keys are in
  the store (otherwise the bot logs in as a fresh device: a device without its keys cannot decrypt);
* :meth:`MatrixE2E.after_login` / :meth:`MatrixE2E.after_sync` -> upload, query and claim keys, send
  queued to-device messages, apply the trust policy (what ``sync_forever`` would do; the adapter runs its
  own sync loop);
* :meth:`MatrixE2E.room_send` -> every event the bot sends; encrypted in an encrypted room (reactions
  too, which nio itself sends in clear), after sharing the room key with the members' trusted devices;
* :meth:`MatrixE2E.on_undecryptable` -> an event the bot cannot decrypt: logged once, keys requested,
  never handled as a command.

**Key storage.** nio's SQLite store (Olm account, sessions, device trust) lives in a directory, by
default next to the database (``bot.db`` -> ``bot.matrix-store/``), configurable as ``matrix.store_path``.
``device.json`` in the same directory records which device those keys belong to, so a restart logs in as
the same device and keeps every session; nobody sees "unable to decrypt" after a restart.

**Trust** (``matrix.trust``) decides which devices get the bot's room keys (who can read what it sends):

* ``all``: every device of every member, always, including devices blacklisted earlier. Convenient, but a
  homeserver admin who adds a device to a member's account can read the bot's messages unnoticed.
* ``tofu`` (default): each device is trusted the first time it is seen and its keys are pinned (nio
  refuses a known device whose keys change); when a user the bot already knows adds a device, the bot
  logs a warning naming it, so an injected device does not go unnoticed. Earlier decisions stored in the
  key store (a blacklisted device) are kept.
* ``verified``: only devices listed in ``matrix.verified_devices`` as ``"@user:server DEVICEID
  ED25519KEY"`` (the key must match) get room keys; every other device is blacklisted, and commands
  from unverified devices are ignored. The safest, and the only setting that protects against a
  malicious homeserver; it needs the fingerprint of every device that should read the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from nio import (
    Api,
    AsyncClient,
    ErrorResponse,
    JoinedMembersError,
    KeysUploadError,
    LocalProtocolError,
    MegolmEvent,
    RoomSendError,
    RoomSendResponse,
)
from nio.crypto import ENCRYPTION_ENABLED, OlmDevice, TrustState
from nio.exceptions import OlmUnverifiedDeviceError

from ..outbox import PermanentError

log = logging.getLogger(__name__)

TRUST_MODES = ("all", "tofu", "verified")
DEFAULT_TRUST = "tofu"
#: The store directory's name next to a SQLite database: ``bot.db`` -> ``bot.matrix-store``.
STORE_SUFFIX = ".matrix-store"
#: Where the store lives when the database is not a file (PostgreSQL): the working directory.
FALLBACK_STORE = "progressbot.matrix-store"
DEVICE_FILE = "device.json"
ENCRYPTED = "m.room.encrypted"


class E2EError(Exception):
    """An encrypted send could not be prepared (keys not shareable yet); retried like a network error."""


def default_store_path(database_url: str | None) -> Path:
    """The key store next to a SQLite database file, or ``./progressbot.matrix-store`` otherwise."""
    if database_url and database_url.startswith("sqlite"):
        # sqlite:///relative.db, sqlite:////abs/path.db, sqlite+driver:///...; not :memory:.
        _, _, rest = database_url.partition(":///")
        path = rest.split("?", 1)[0]
        if path and path != ":memory:":
            db = Path(path)
            return db.with_name(db.stem + STORE_SUFFIX)
    return Path(FALLBACK_STORE)


def parse_verified_devices(entries: list[str]) -> dict[tuple[str, str], str]:
    """``"@user:server DEVICE ED25519"`` entries -> ``{(user, device): ed25519}``; bad entries raise."""
    out: dict[tuple[str, str], str] = {}
    for entry in entries:
        parts = str(entry).split()
        if len(parts) != 3 or not parts[0].startswith("@"):
            raise ValueError(f'matrix.verified_devices: {entry!r} is not "@user:server DEVICEID ED25519KEY"')
        out[(parts[0], parts[1])] = parts[2]
    return out


class MatrixE2E:
    """Encryption support of one adapter's nio client (see the module docstring)."""

    def __init__(
        self,
        *,
        enabled: bool,
        trust: str,
        store_path: str | os.PathLike[str] | None,
        database_url: str | None,
        verified_devices: list[str] | None = None,
    ) -> None:
        if trust not in TRUST_MODES:
            raise ValueError(f"matrix.trust must be one of {', '.join(TRUST_MODES)}, not {trust!r}")
        self.trust = trust
        self.verified = parse_verified_devices(list(verified_devices or []))
        if enabled and not ENCRYPTION_ENABLED:
            log.warning(
                "matrix: end-to-end encryption is unavailable (install matrix-nio[e2e]); "
                "encrypted rooms will not work"
            )
        self.enabled = bool(enabled and ENCRYPTION_ENABLED)
        self.store_dir = Path(store_path) if store_path else default_store_path(database_url)
        self._share_locks: dict[str, asyncio.Lock] = {}
        self._members_loaded: set[str] = set()
        #: Megolm sessions we could not decrypt and already logged and asked keys for.
        self._undecryptable: set[str] = set()
        self._warned: set[str] = set()
        self._upload_failed = False
        self.stats_undecryptable = 0

    # ------------------------------------------------------------------ store and device
    def prepare_client(self, client: AsyncClient) -> None:
        """Give the client its store directory (created private: it holds the bot's secret keys)."""
        if not self.enabled:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        client.store_path = str(self.store_dir)

    def stored_device(self, user_id: str) -> str | None:
        """The device whose keys the store holds for ``user_id`` (None when there are none yet)."""
        try:
            data = json.loads((self.store_dir / DEVICE_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("user_id") != user_id:
            return None
        device = data.get("device_id")
        return str(device) if device else None

    def can_resume(self, user_id: str, device_id: str | None) -> bool:
        """Whether a session of ``device_id`` may be resumed: its keys must be in the store.

        Resuming a device whose keys are lost would upload a second identity for it, which the
        homeserver refuses and other clients distrust; a fresh login gives a clean device instead.
        """
        return not self.enabled or (device_id is not None and device_id == self.stored_device(user_id))

    async def after_login(self, client: AsyncClient) -> None:
        """Record the device with its keys, and publish the keys of a new device."""
        if not self.enabled or client.olm is None:
            return
        path = self.store_dir / DEVICE_FILE
        record = {"user_id": client.user_id, "device_id": client.device_id}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
        log.info(
            "matrix: end-to-end encryption on (device %s, key store %s, trust %s)",
            client.device_id,
            self.store_dir,
            self.trust,
        )
        await self._upload_keys(client)

    async def _upload_keys(self, client: AsyncClient) -> None:
        if self._upload_failed or not client.should_upload_keys:
            return
        resp = await client.keys_upload()
        if isinstance(resp, KeysUploadError):
            # Typically: the device already has other keys on the server (its store was lost while
            # its access token was kept). Repeating cannot help; say what to do, once.
            self._upload_failed = True
            log.error(
                "matrix: the homeserver refused the encryption keys of device %s (%s %s); encrypted "
                "rooms will not work. Keep %s with the bot's access token, or log in with a password "
                "to get a fresh device.",
                client.device_id,
                resp.status_code,
                resp.message,
                self.store_dir,
            )

    # ------------------------------------------------------------------ after each sync
    async def after_sync(self, client: AsyncClient) -> None:
        """Key housekeeping after a sync: what nio's ``sync_forever`` does, plus the trust policy."""
        if not self.enabled or client.olm is None:
            return
        await client.send_to_device_messages()
        await self._upload_keys(client)
        if client.should_query_keys:
            await client.keys_query()
        if client.should_claim_keys:
            with contextlib.suppress(LocalProtocolError):  # nothing to claim after all
                await client.keys_claim(client.get_users_for_key_claiming())
        self.apply_trust(client)

    def apply_trust(self, client: AsyncClient) -> None:
        """Decide, for every device the bot knows and has not decided on, whether it gets room keys.

        Trusting a device invalidates the room's outbound session (nio does that), so the next send
        shares a fresh room key that includes it: a member's new device reads later messages.
        """
        if client.olm is None:
            return
        devices = [d for d in client.device_store if not d.deleted and d.id != client.device_id]
        if self.trust == "verified":
            for d in devices:
                self._apply_verified(client, d)
            return
        known_users = {d.user_id for d in devices if d.trust_state != TrustState.unset}
        for d in devices:
            if self.trust == "all":
                if d.blacklisted:
                    client.unblacklist_device(d)
                if not d.verified:
                    client.verify_device(d)
            elif d.trust_state == TrustState.unset:
                if d.user_id in known_users:
                    log.warning(
                        "matrix: %s has a new device %s (%r, ed25519 %s); trusting it on first use "
                        "(matrix.trust = tofu). If this user did not add it, blacklist it or use "
                        "matrix.trust = verified.",
                        d.user_id,
                        d.id,
                        d.display_name,
                        d.ed25519,
                    )
                client.verify_device(d)

    def _apply_verified(self, client: AsyncClient, d: OlmDevice) -> None:
        expected = self.verified.get((d.user_id, d.id))
        if expected is not None and expected == d.ed25519:
            if d.blacklisted:
                client.unblacklist_device(d)
            if not d.verified:
                client.verify_device(d)
            return
        if not d.blacklisted:
            if d.verified:
                client.unverify_device(d)
            client.blacklist_device(d)
            why = "its key does not match" if expected is not None else "it is not in matrix.verified_devices"
            log.warning(
                "matrix: not sharing room keys with device %s of %s (ed25519 %s): %s",
                d.id,
                d.user_id,
                d.ed25519,
                why,
            )

    # ------------------------------------------------------------------ sending
    def encrypted(self, client: AsyncClient, room_id: str) -> bool:
        """Whether events to ``room_id`` must be encrypted."""
        room = client.rooms.get(room_id)
        return bool(room is not None and room.encrypted)

    async def room_send(
        self, client: AsyncClient, room_id: str, event_type: str, content: dict[str, Any], tx_id: str
    ) -> RoomSendResponse | RoomSendError:
        """Send one event; in an encrypted room, encrypt it (whatever its type) after sharing the room key.

        The relation (``m.relates_to``) moves to the clear part of the encrypted event, as the spec asks,
        so the homeserver can aggregate edits and reactions; everything else, including an edit's
        ``m.new_content``, is inside the ciphertext. Errors come back as nio responses (the caller's
        ``check`` turns them into the scheduler's exceptions) or as :class:`E2EError`.
        """
        if not self.encrypted(client, room_id):
            return await client.room_send(room_id, event_type, content, tx_id=tx_id)
        if not self.enabled or client.olm is None:
            # Never leak into an encrypted room in clear what its members expect to be private.
            self.warn_room(room_id)
            raise PermanentError(f"room {room_id} is encrypted and encryption is off; not sent")
        prepared = await self._share_room_key(client, room_id)
        if isinstance(prepared, ErrorResponse):
            return prepared  # type: ignore[return-value]
        payload = dict(content)
        relation = payload.pop("m.relates_to", None)
        try:
            _, encrypted = client.encrypt(room_id, event_type, payload)
        except LocalProtocolError as exc:  # e.g. the session was invalidated in between
            raise E2EError(f"encrypting for {room_id} failed: {exc}") from exc
        wire: dict[str, Any] = dict(encrypted)
        if relation is not None:
            wire["m.relates_to"] = relation
        method, path, data = Api.room_send(client.access_token, room_id, ENCRYPTED, wire, tx_id)
        # nio's room_send would send reactions in clear and encrypt an m.room.encrypted twice, so the
        # already-encrypted event goes through nio's own request path.
        return await client._send(RoomSendResponse, method, path, data, (room_id,))

    async def _share_room_key(self, client: AsyncClient, room_id: str) -> ErrorResponse | None:
        """Make sure the room's outbound session exists and reached every trusted device of its members."""
        lock = self._share_locks.setdefault(room_id, asyncio.Lock())
        async with lock:
            room = client.rooms[room_id]
            if not room.members_synced or room_id not in self._members_loaded:
                members = await client.joined_members(room_id)
                if isinstance(members, JoinedMembersError):
                    return members
                self._members_loaded.add(room_id)
            if client.should_query_keys:
                resp = await client.keys_query()
                if isinstance(resp, ErrorResponse):
                    return resp
            self.apply_trust(client)
            if not client.olm or not client.olm.should_share_group_session(room_id):
                return None
            try:
                resp = await client.share_group_session(room_id, ignore_unverified_devices=False)
            except OlmUnverifiedDeviceError as exc:
                # A device appeared between the policy and the share (a key query inside): decide
                # on it, then share once more; never with a device the policy has not accepted.
                self.apply_trust(client)
                try:
                    resp = await client.share_group_session(room_id, ignore_unverified_devices=False)
                except OlmUnverifiedDeviceError:
                    raise E2EError(f"room {room_id}: {exc}") from exc
            if isinstance(resp, ErrorResponse):
                return resp
            return None

    def forget_room(self, room_id: str) -> None:
        """Reload the members before the next send (after membership changes nio has not seen)."""
        self._members_loaded.discard(room_id)

    # ------------------------------------------------------------------ receiving
    def accepts(self, event: Any) -> bool:
        """Whether a (possibly decrypted) event may be acted upon under the trust policy.

        With ``verified``, a decrypted event from an unverified device is ignored: anyone could
        add a device to a member's account on a hostile homeserver.
        """
        if self.trust != "verified" or not getattr(event, "decrypted", False):
            return True
        if getattr(event, "verified", False):
            return True
        log.warning(
            "matrix: ignoring %s from an unverified device of %s (matrix.trust = verified)",
            getattr(event, "event_id", "an event"),
            getattr(event, "sender", "?"),
        )
        return False

    def on_undecryptable(
        self, client: AsyncClient, room_id: str, event: MegolmEvent
    ) -> Awaitable[None] | None:
        """An event the bot cannot decrypt: log once per session and return the key request to run.

        It is never answered and never taken for a command (it stays a :class:`MegolmEvent`).
        """
        self.stats_undecryptable += 1
        session = str(event.session_id)
        if session in self._undecryptable:
            log.debug("matrix: %s in %s is undecryptable too (session %s)", event.event_id, room_id, session)
            return None
        self._undecryptable.add(session)
        log.warning(
            "matrix: cannot decrypt %s from %s (device %s) in %s: the bot never got its room key "
            "(session %s); requesting it. The event is ignored.",
            event.event_id,
            event.sender,
            event.device_id,
            room_id,
            session,
        )
        return self._request_key(client, event)

    async def _request_key(self, client: AsyncClient, event: MegolmEvent) -> None:
        try:
            resp = await client.request_room_key(event)
        except LocalProtocolError:
            return  # already requested (by this process)
        except Exception as exc:
            log.info("matrix: could not request the room key for %s: %s", event.event_id, exc)
            return
        if isinstance(resp, ErrorResponse):
            log.info("matrix: the room key request for %s failed: %s", event.event_id, resp.message)

    def warn_room(self, room_id: str) -> None:
        """Say once per room that it is encrypted but encryption is off or unavailable."""
        if room_id not in self._warned:
            self._warned.add(room_id)
            log.warning(
                "matrix: room %s is encrypted but end-to-end encryption is off (matrix.encryption, or "
                "matrix-nio[e2e] missing); the bot sends nothing there and cannot read it",
                room_id,
            )
