"""Session-scoped pytest fixtures that start real servers on 127.0.0.1.

Load it from a test module (or a conftest) with::

    pytest_plugins = ["tests.servers.conftest_plugin"]

Fixtures:

* ``synapse_server`` -> :class:`SynapseFixture`: one Synapse for the whole session, login/join/
  invite/room-creation limits lifted but ``rc_message`` at Synapse's default; users ``bot``
  (server admin), ``alice`` and ``bob`` registered.
* ``postgres_server`` -> :class:`~tests.servers.postgres.PostgresServer`: one PostgreSQL cluster
  with database ``progressbot_test`` (``.url``) and ``.create_database(name)`` for isolation.

The fixtures are synchronous on purpose: they only run subprocesses and urllib calls, so they
do not depend on pytest-asyncio's event-loop scopes. If a server cannot be started because it
is not installed, the test is skipped with the reason, unless ``$CI`` is set: then it fails,
so a broken CI image cannot silently skip the integration tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.servers.postgres import PostgresServer
from tests.servers.synapse import SynapseServer

__all__ = ["MatrixUser", "SynapseFixture", "postgres_server", "synapse_server"]


@dataclass(frozen=True)
class MatrixUser:
    """A registered account on the test homeserver."""

    localpart: str
    user_id: str
    password: str
    admin: bool = False


@dataclass
class SynapseFixture:
    """What ``synapse_server`` yields: the running server plus the registered test users."""

    server: SynapseServer
    bot: MatrixUser
    alice: MatrixUser
    bob: MatrixUser
    users: dict[str, MatrixUser] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        """Client-server API base URL, e.g. ``http://127.0.0.1:PORT``."""
        return self.server.base_url

    @property
    def server_name(self) -> str:
        """The homeserver's server name (``localhost``)."""
        return self.server.server_name

    @property
    def bot_user_id(self) -> str:
        """``@bot:localhost`` (a server admin)."""
        return self.bot.user_id

    @property
    def bot_password(self) -> str:
        """Password of ``@bot:localhost``."""
        return self.bot.password

    @property
    def alice_user_id(self) -> str:
        """``@alice:localhost``."""
        return self.alice.user_id

    @property
    def alice_password(self) -> str:
        """Password of ``@alice:localhost``."""
        return self.alice.password

    @property
    def bob_user_id(self) -> str:
        """``@bob:localhost``."""
        return self.bob.user_id

    @property
    def bob_password(self) -> str:
        """Password of ``@bob:localhost``."""
        return self.bob.password

    def register(self, localpart: str, password: str, admin: bool = False) -> MatrixUser:
        """Register one more user (idempotent) and remember it in :attr:`users`."""
        user = MatrixUser(localpart, self.server.register(localpart, password, admin), password, admin)
        self.users[localpart] = user
        return user


def _unavailable(reason: str) -> None:
    """Skip the requesting test, or fail it when running in CI (``$CI`` set)."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so this is an error, not a skip: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def synapse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseFixture]:
    """A session-wide real Synapse on 127.0.0.1 with users bot (admin), alice and bob.

    Rate limits: login, joins, invites, room creation, registration and presence are lifted
    (the suite logs in and creates rooms a lot); ``rc_message`` keeps Synapse's default so the
    edit-scheduler tests see real 429s. Use ``fixture.server.override_ratelimit(...)`` to
    lift or impose a per-user message limit, and fresh rooms per test for isolation.
    Its files (config, ``synapse.log``) stay under pytest's basetemp for debugging.
    """
    ok, reason = SynapseServer.available()
    if not ok:
        _unavailable(f"Synapse unavailable: {reason}")
    server = SynapseServer(tmp_path_factory.mktemp("synapse"), ratelimits="lifted", lift_messages=False)
    try:
        server.start()
        users = {
            name: MatrixUser(name, server.register(name, password, admin), password, admin)
            for name, password, admin in (
                ("bot", "bot-password", True),
                ("alice", "alice-password", False),
                ("bob", "bob-password", False),
            )
        }
        yield SynapseFixture(server, users["bot"], users["alice"], users["bob"], users)
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A session-wide real PostgreSQL on 127.0.0.1 with database ``progressbot_test``.

    ``.url`` is ``postgresql+psycopg://postgres@127.0.0.1:PORT/progressbot_test``;
    ``.create_database(name)`` returns the URL of a fresh database for isolation.
    """
    ok, reason = PostgresServer.available()
    if not ok:
        _unavailable(f"PostgreSQL unavailable: {reason}")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()
