"""Smoke tests for the real-server test helpers (tests/servers): Synapse and PostgreSQL.

They prove the fixtures work end to end, so a failure here points at the environment or the
helpers rather than at progressbot itself.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import pytest
from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    LoginResponse,
    RoomCreateResponse,
    RoomMessageText,
    RoomSendError,
    RoomSendResponse,
    SyncResponse,
)

if TYPE_CHECKING:
    # Type-only imports: importing the plugin module here, before pytest loads it through
    # pytest_plugins, would stop pytest from assertion-rewriting it (PytestAssertRewriteWarning).
    from tests.servers.conftest_plugin import SynapseFixture
    from tests.servers.postgres import PostgresServer

pytest_plugins = ["tests.servers.conftest_plugin"]

pytestmark = pytest.mark.slow

# Surface 429s instead of nio's silent infinite retry, and never hang on a dead server.
NIO_CONFIG = AsyncClientConfig(max_limit_exceeded=0, max_timeouts=2, request_timeout=15)


async def _login(base_url: str, user_id: str, password: str) -> AsyncClient:
    """Return a logged-in nio client (the caller must ``await client.close()``)."""
    client = AsyncClient(base_url, user_id, config=NIO_CONFIG)
    resp = await client.login(password, device_name="smoke-test")
    if not isinstance(resp, LoginResponse):
        await client.close()
        raise AssertionError(f"login {user_id} failed: {resp}")
    return client


@pytest.mark.matrix
def test_synapse_users_registered(synapse_server: SynapseFixture) -> None:
    """The session server answers, and bot/alice/bob exist with the advertised passwords."""
    hs = synapse_server.server
    assert hs.request("GET", "/_matrix/client/versions")["versions"]
    assert synapse_server.base_url.startswith("http://127.0.0.1:")
    for user in (synapse_server.bot, synapse_server.alice, synapse_server.bob):
        assert hs.login(user.user_id, user.password)["user_id"] == user.user_id
    # bot is a server admin: it may use the admin API.
    token = hs.admin_token(synapse_server.bot_user_id, synapse_server.bot_password)
    who = hs.request("GET", f"/_synapse/admin/v2/users/{synapse_server.alice_user_id}", token=token)
    assert who["name"] == "@alice:localhost"
    # register() is idempotent.
    assert hs.register("alice", synapse_server.alice_password) == synapse_server.alice_user_id


@pytest.mark.matrix
@pytest.mark.asyncio
async def test_nio_message_alice_to_bob(synapse_server: SynapseFixture) -> None:
    """alice creates a room and sends; bob (second client) reads the message back via /sync."""
    alice = await _login(synapse_server.base_url, synapse_server.alice_user_id, synapse_server.alice_password)
    bob = await _login(synapse_server.base_url, synapse_server.bob_user_id, synapse_server.bob_password)
    try:
        created = await alice.room_create(name="smoke", invite=[synapse_server.bob_user_id])
        assert isinstance(created, RoomCreateResponse), created
        joined = await bob.join(created.room_id)
        assert isinstance(joined, JoinResponse), joined

        body = f"hello bob {uuid.uuid4().hex}"
        sent = await alice.room_send(created.room_id, "m.room.message", {"msgtype": "m.text", "body": body})
        assert isinstance(sent, RoomSendResponse), sent

        found = None
        deadline = time.monotonic() + 15
        while found is None and time.monotonic() < deadline:
            resp = await bob.sync(timeout=2000)
            assert isinstance(resp, SyncResponse), resp
            room = resp.rooms.join.get(created.room_id)
            for event in room.timeline.events if room else []:
                if isinstance(event, RoomMessageText) and event.body == body:
                    found = event
        assert found is not None, "bob never saw alice's message"
        assert found.sender == synapse_server.alice_user_id
        assert found.event_id == sent.event_id
    finally:
        await alice.close()
        await bob.close()


@pytest.mark.matrix
@pytest.mark.asyncio
async def test_ratelimits_login_lifted_messages_default(synapse_server: SynapseFixture) -> None:
    """Logins are unlimited, but rc_message keeps Synapse's default (burst ~10, then 429)."""
    hs = synapse_server.server
    # A throw-away user, so the shared users' message budget is not used up.
    name = f"rl{uuid.uuid4().hex[:8]}"
    user_id = hs.register(name, "pw")
    for _ in range(8):  # Synapse's default rc_login would refuse the 6th login.
        hs.login(user_id, "pw")

    client = await _login(synapse_server.base_url, user_id, "pw")
    try:
        created = await client.room_create()
        assert isinstance(created, RoomCreateResponse), created
        limited: RoomSendError | None = None
        for i in range(15):
            resp = await client.room_send(
                created.room_id, "m.room.message", {"msgtype": "m.text", "body": str(i)}
            )
            if isinstance(resp, RoomSendError):
                limited = resp
                break
        assert limited is not None, "15 messages went through: rc_message is not at its default"
        assert limited.status_code == "M_LIMIT_EXCEEDED"
        assert limited.retry_after_ms and limited.retry_after_ms > 0

        # The admin override lifts it for this user immediately.
        hs.override_ratelimit(user_id, 0, 0)
        ok = await client.room_send(created.room_id, "m.room.message", {"msgtype": "m.text", "body": "x"})
        assert isinstance(ok, RoomSendResponse), ok
    finally:
        await client.close()


@pytest.mark.matrix
def test_synapse_restart_keeps_users(synapse_server: SynapseFixture) -> None:
    """restart() comes back on the same URL; users and access tokens survive."""
    hs = synapse_server.server
    base_url = hs.base_url
    token = hs.login(synapse_server.alice_user_id, synapse_server.alice_password)["access_token"]
    old_pid = hs.pid

    hs.restart()

    assert hs.base_url == base_url
    assert hs.pid is not None and hs.pid != old_pid
    who = hs.request("GET", "/_matrix/client/v3/account/whoami", token=token)
    assert who["user_id"] == synapse_server.alice_user_id
    for user in (synapse_server.bot, synapse_server.alice, synapse_server.bob):
        assert hs.login(user.user_id, user.password)["user_id"] == user.user_id


@pytest.mark.matrix
@pytest.mark.asyncio
async def test_nio_works_after_restart(synapse_server: SynapseFixture) -> None:
    """A fresh nio client can log in and send after the restart above (fixture still usable)."""
    alice = await _login(synapse_server.base_url, synapse_server.alice_user_id, synapse_server.alice_password)
    try:
        created = await alice.room_create()
        assert isinstance(created, RoomCreateResponse), created
        sent = await alice.room_send(created.room_id, "m.room.message", {"msgtype": "m.text", "body": "hi"})
        assert isinstance(sent, RoomSendResponse), sent
    finally:
        await alice.close()


@pytest.mark.postgres
def test_postgres_select_1(postgres_server: PostgresServer) -> None:
    """psycopg connects to the session cluster and runs SELECT 1; per-test databases work."""
    import psycopg

    assert postgres_server.url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert postgres_server.url.endswith("/progressbot_test")
    with psycopg.connect(postgres_server.conninfo()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT current_database()").fetchone() == ("progressbot_test",)

    name = f"smoke_{uuid.uuid4().hex[:8]}"
    url = postgres_server.create_database(name)
    assert url == postgres_server.url_for(name)
    with psycopg.connect(postgres_server.conninfo(name)) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (name,)
    postgres_server.drop_database(name)


@pytest.mark.postgres
def test_postgres_sqlalchemy_url(postgres_server: PostgresServer) -> None:
    """The advertised SQLAlchemy URL (``postgresql+psycopg://``) works as is."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(postgres_server.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
