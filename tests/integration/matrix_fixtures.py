"""Fixtures of the Matrix integration tests, loaded as a plugin by each Matrix test module.

Use ``pytest_plugins = ["tests.servers.conftest_plugin", "tests.integration.matrix_fixtures"]``; do not
import this module directly (pytest could then not rewrite its asserts).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest_asyncio

from adapters.matrix import MatrixConfig
from tests.integration.matrix_helpers import BotHarness, UserClient, World

if TYPE_CHECKING:
    from tests.servers.conftest_plugin import SynapseFixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(synapse_server: SynapseFixture) -> Any:
    """Log alice and bob in once per module; lift their and the bot's message limits.

    The default ``rc_message`` stays for everyone else: the rate-limit test uses its own bot account.
    """
    hs = synapse_server.server
    for user in (synapse_server.alice, synapse_server.bob, synapse_server.bot):
        hs.override_ratelimit(user.user_id, 0, 0)
    token = str(hs.login(synapse_server.bot_user_id, synapse_server.bot_password)["access_token"])
    alice = UserClient(synapse_server.base_url, synapse_server.alice_user_id, synapse_server.alice_password)
    bob = UserClient(synapse_server.base_url, synapse_server.bob_user_id, synapse_server.bob_password)
    await alice.login()
    await bob.login()
    try:
        yield World(synapse_server, alice, bob, token)
    finally:
        await alice.close()
        await bob.close()


@pytest_asyncio.fixture(loop_scope="module")
async def room(world: World) -> str:
    """A fresh room per test."""
    return await world.new_room()


@pytest_asyncio.fixture(loop_scope="module")
async def bots(tmp_path: Path) -> Any:
    """Make bot harnesses (``await bots(config)``); every one still running is stopped afterwards."""
    made: list[BotHarness] = []

    async def make(config: MatrixConfig, *, db: str = "bot.db", start: bool = True, **kw: Any) -> BotHarness:
        h = BotHarness(tmp_path / db, config, **kw)
        made.append(h)
        if start:
            await h.start()
        return h

    yield make
    for h in reversed(made):
        with contextlib.suppress(Exception):
            await h.stop()
