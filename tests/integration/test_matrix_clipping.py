"""Against a real Synapse: a reply to an 8,000-character command stays far under the event size limit, and
a plain member's ``!run maintenance.cleanup`` is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.matrix_helpers import World, content_of

pytest_plugins = ["tests.servers.conftest_plugin", "tests.integration.matrix_fixtures"]

pytestmark = [pytest.mark.matrix, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

#: Synapse refuses events over 65,536 bytes.
MATRIX_EVENT_LIMIT = 65_536


async def test_replies_to_huge_commands_stay_small(world: World, room: str, bots: Any) -> None:
    alice = world.alice
    await bots(world.config(room))
    for command in (f"!run {'x' * 7990}", f"!run demo.count {'y' * 7980}", f"!status {'1' * 7990}"):
        ev = await alice.command(room, command)
        assert ev is not None, command[:20]
        content = content_of(ev)
        assert len(json.dumps(content).encode()) < 16_000 < MATRIX_EVENT_LIMIT
        assert len(str(content.get("body", ""))) < 600
        assert "Traceback" not in str(content.get("body", ""))


async def test_plain_member_cannot_run_cleanup(world: World, room: str, bots: Any) -> None:
    alice = world.alice
    h = await bots(world.config(room))
    ev = await alice.command(room, "!run maintenance.cleanup older_than_days=0")
    assert str(content_of(ev or {}).get("body", "")).endswith(
        "only admins may start maintenance.cleanup jobs."
    )
    assert (await h.service.stats())["total"] == 0
