"""A Matrix user with end-to-end encryption, for the encrypted-room tests and the latency bench.

:class:`EncryptedUserClient` is a :class:`~tests.integration.matrix_helpers.UserClient` whose nio client
has its own key store and does the key housekeeping after every sync (what ``sync_forever`` would do).
It trusts every device it meets (it is the test's person, not the system under test), so what it records
is the *decrypted* timeline: the reading helpers of ``matrix_helpers`` work on it unchanged, while
:meth:`EncryptedUserClient.raw_events` shows what the homeserver actually stores.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import uuid4

from nio import (
    Api,
    AsyncClient,
    AsyncClientConfig,
    LocalProtocolError,
    RoomCreateResponse,
    RoomSendResponse,
    SyncResponse,
)
from nio.crypto import OutboundGroupSession, TrustState

from tests.integration.matrix_helpers import Event, UserClient

MEGOLM = "m.megolm.v1.aes-sha2"
ENCRYPTION_STATE = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}


class _E2EClient(AsyncClient):
    """A nio client that keeps its keys current after each sync and trusts every device it sees."""

    async def sync(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Sync, then upload/query/claim keys and send queued to-device messages."""
        resp = await super().sync(*args, **kwargs)
        if isinstance(resp, SyncResponse):
            await self.housekeeping()
        return resp

    async def housekeeping(self) -> None:
        """Key upload, query and claim; to-device messages; trust new devices."""
        if self.should_upload_keys:
            await self.keys_upload()
        if self.should_query_keys:
            await self.keys_query()
        if self.should_claim_keys:
            with contextlib.suppress(LocalProtocolError):
                await self.keys_claim(self.get_users_for_key_claiming())
        await self.send_to_device_messages()
        self.trust_all()

    def trust_all(self) -> None:
        """Verify every unset device (verifying one re-keys the rooms it is in)."""
        for device in list(self.device_store):
            if device.trust_state == TrustState.unset and not device.deleted:
                self.verify_device(device)

    async def prepare_room(self, room_id: str) -> None:
        """Learn the room members' current devices and trust them (what a send needs first)."""
        room = self.rooms.get(room_id)
        if self.olm is not None and room is not None and room.encrypted:
            if not room.members_synced:
                await self.joined_members(room_id)
            for user in room.users:
                self.olm.users_for_key_query.add(user)
            await self.keys_query()
            self.trust_all()

    async def room_send(  # type: ignore[override]
        self, room_id: str, message_type: str, content: dict[Any, Any], tx_id: str | None = None, **_: Any
    ) -> Any:
        """Send like a person's client: learn the members' current devices first, share with all."""
        await self.prepare_room(room_id)
        return await super().room_send(room_id, message_type, content, tx_id, ignore_unverified_devices=True)


class EncryptedUserClient(UserClient):
    """A person with an encrypting client (own device, own key store); records decrypted events."""

    def __init__(self, base_url: str, user_id: str, password: str, store_dir: Path) -> None:
        super().__init__(base_url, user_id, password)
        store_dir.mkdir(parents=True, exist_ok=True)
        config = AsyncClientConfig(
            max_limit_exceeded=0,
            max_timeouts=3,
            request_timeout=15,
            encryption_enabled=True,
            store_sync_tokens=False,
        )
        # UserClient.login logs in as a new device; the first sync's housekeeping publishes its keys.
        self.client = _E2EClient(base_url, user_id, store_path=str(store_dir), config=config)

    @property
    def device_id(self) -> str:
        """This client's device id."""
        return str(self.client.device_id)

    async def create_encrypted_room(self, *, bot: str, others: list[str], bot_power: int = 50) -> str:
        """Create a private room with ``m.room.encryption``, inviting the bot and ``others``."""
        resp = await self.client.room_create(
            name="progressbot e2e test",
            invite=[bot, *others],
            initial_state=[ENCRYPTION_STATE],
            power_level_override={"users": {bot: bot_power}},
        )
        assert isinstance(resp, RoomCreateResponse), resp
        return str(resp.room_id)

    async def raw_events(self, room_id: str) -> list[Event]:
        """The room's timeline as the homeserver stores it (oldest first), without decrypting anything."""
        client = self.client
        path = f"/_matrix/client/v3/rooms/{quote(room_id)}/messages?dir=b&limit=1000"
        headers = {"Authorization": f"Bearer {client.access_token}"}
        assert client.client_session is not None
        async with client.client_session.get(client.homeserver + path, headers=headers) as r:
            assert r.status == 200, await r.text()
            data = json.loads(await r.text())
        return list(reversed(data.get("chunk") or []))

    async def react_encrypted(self, room_id: str, event_id: str, key: str) -> str:
        """React as Element does in an encrypted room: the reaction encrypted, its relation in clear."""
        client = self.client
        await client.prepare_room(room_id)
        assert client.olm is not None
        if client.olm.should_share_group_session(room_id):
            await client.share_group_session(room_id, ignore_unverified_devices=True)
        _, payload = client.encrypt(room_id, "m.reaction", {})
        payload = {**payload, "m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}}
        return await self._send_encrypted(room_id, payload)

    async def send_unshared(self, room_id: str, *bodies: str) -> list[str]:
        """Send encrypted ``m.text`` events with one fresh Megolm session whose key nobody ever received.

        This is what a bot sees when a sender's client failed to share its room key with it.
        """
        client = self.client
        assert client.olm is not None
        session = OutboundGroupSession()
        session.mark_as_shared()  # "shared" with nobody: that is the point
        sent: list[str] = []
        for body in bodies:
            text = {"msgtype": "m.text", "body": body}
            plaintext = {"type": "m.room.message", "content": text, "room_id": room_id}
            content = {
                "algorithm": MEGOLM,
                "sender_key": client.olm.account.identity_keys["curve25519"],
                "ciphertext": session.encrypt(json.dumps(plaintext)),
                "session_id": session.id,
                "device_id": client.device_id,
            }
            sent.append(await self._send_encrypted(room_id, content))
        return sent

    async def _send_encrypted(self, room_id: str, content: dict[str, Any]) -> str:
        """PUT an already encrypted event (nio's room_send would encrypt it again)."""
        client = self.client
        method, path, data = Api.room_send(
            client.access_token, room_id, "m.room.encrypted", content, uuid4().hex
        )
        resp = await client._send(RoomSendResponse, method, path, data, (room_id,))
        assert isinstance(resp, RoomSendResponse), resp
        return str(resp.event_id)
