"""The Matrix E2E configuration and trust policy, on nio's real in-memory key store (no homeserver).

Which devices end up trusted decides who can read what the bot sends, so each ``matrix.trust`` setting
is checked on the device store nio itself keeps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from nio import AsyncClient, AsyncClientConfig
from nio.crypto import OlmDevice
from nio.store import SqliteMemoryStore
from pydantic import ValidationError

from adapters.matrix import MatrixConfig
from adapters.matrix.e2e import FALLBACK_STORE, MatrixE2E, default_store_path, parse_verified_devices
from bot.settings import MatrixSettings

BOB = "@bob:example.org"


def _client() -> AsyncClient:
    client = AsyncClient(
        "http://127.0.0.1:1",
        "@bot:example.org",
        config=AsyncClientConfig(store=SqliteMemoryStore, encryption_enabled=True),
    )
    client.restore_login("@bot:example.org", "BOTDEVICE", "token")  # loads the (in-memory) key store
    assert client.olm is not None
    return client


def _device(client: AsyncClient, device_id: str, user: str = BOB) -> OlmDevice:
    device = OlmDevice(user, device_id, {"ed25519": f"ed-{device_id}", "curve25519": f"cu-{device_id}"})
    client.device_store.add(device)
    assert client.olm is not None
    client.olm.store.save_device_keys({user: {device_id: device}})  # as a key query would
    return device


def _e2e(trust: str, verified: list[str] | None = None) -> MatrixE2E:
    return MatrixE2E(
        enabled=True, trust=trust, store_path="unused", database_url=None, verified_devices=verified
    )


def test_store_sits_next_to_a_sqlite_database() -> None:
    """``bot.db`` -> ``bot.matrix-store``; non-file databases use the working directory."""
    assert default_store_path("sqlite:////var/lib/pb/bot.db") == Path("/var/lib/pb/bot.matrix-store")
    assert default_store_path("sqlite:///progressbot.db") == Path("progressbot.matrix-store")
    assert default_store_path("sqlite+aiosqlite:///data/x.sqlite3?timeout=5") == Path("data/x.matrix-store")
    assert default_store_path("postgresql+psycopg://u@h/db") == Path(FALLBACK_STORE)
    assert default_store_path("sqlite:///:memory:") == Path(FALLBACK_STORE)


def test_settings_carry_the_e2e_keys_and_refuse_an_unknown_trust() -> None:
    """``matrix.trust`` is checked when the settings load; the adapter config gets every E2E key."""
    s = MatrixSettings(
        homeserver="http://hs",
        user_id="@bot:hs",
        password="pw",
        store_path="/keys",
        trust="verified",
        verified_devices=["@a:hs DEV KEY"],
    )
    cfg = MatrixConfig.from_settings(s)
    assert (cfg.encryption, cfg.store_path, cfg.trust, cfg.verified_devices) == (
        True,
        "/keys",
        "verified",
        ["@a:hs DEV KEY"],
    )
    with pytest.raises(ValidationError, match="trust"):
        MatrixSettings(homeserver="http://hs", user_id="@bot:hs", password="pw", trust="everyone")
    with pytest.raises(ValueError, match=r"matrix\.trust"):
        _e2e("everyone")


def test_verified_devices_need_user_device_and_key() -> None:
    """A malformed entry is a clear configuration error, not a silently ignored line."""
    assert parse_verified_devices(["@a:hs DEV KEY"]) == {("@a:hs", "DEV"): "KEY"}
    with pytest.raises(ValueError, match="verified_devices"):
        parse_verified_devices(["@a:hs DEV"])


def test_tofu_trusts_first_devices_quietly_and_warns_about_a_new_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user's first device is trusted silently; a device added later is trusted with a warning."""
    client = _client()
    e2e = _e2e("tofu")
    first = _device(client, "PHONE")
    with caplog.at_level(logging.WARNING):
        e2e.apply_trust(client)
    assert first.verified and not caplog.records
    second = _device(client, "LAPTOP")
    with caplog.at_level(logging.WARNING):
        e2e.apply_trust(client)
    assert second.verified
    assert [r for r in caplog.records if "new device LAPTOP" in r.getMessage() and BOB in r.getMessage()]
    # A device blacklisted by hand stays blacklisted under tofu.
    client.blacklist_device(second)
    e2e.apply_trust(client)
    assert second.blacklisted


def test_all_trusts_every_device_even_a_blacklisted_one() -> None:
    """``all`` overrides earlier decisions: every device gets the room keys."""
    client = _client()
    dev = _device(client, "PHONE")
    client.blacklist_device(dev)
    _e2e("all").apply_trust(client)
    assert dev.verified and not dev.blacklisted


def test_verified_shares_only_with_listed_devices_whose_key_matches() -> None:
    """Listed with the right key: trusted. Unlisted, or listed with another key: blacklisted."""
    client = _client()
    good = _device(client, "GOOD")
    wrong_key = _device(client, "WRONGKEY")
    unlisted = _device(client, "OTHER")
    e2e = _e2e("verified", [f"{BOB} GOOD ed-GOOD", f"{BOB} WRONGKEY ed-SOMETHING-ELSE"])
    e2e.apply_trust(client)
    assert good.verified
    assert wrong_key.blacklisted and unlisted.blacklisted


def test_a_malformed_verified_device_is_a_settings_error() -> None:
    """The settings refuse an entry without user, device and key before anything starts."""
    with pytest.raises(ValidationError, match="verified_devices"):
        MatrixSettings(homeserver="http://hs", user_id="@bot:hs", password="pw", verified_devices=["DEVICE"])
