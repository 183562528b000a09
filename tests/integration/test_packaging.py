"""Packaging as a new user meets it: the wheel in a clean virtualenv, optional extras, shadowed packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(
    cmd: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a new user: no PYTHONPATH pointing into the source tree, no progressbot config."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PROGRESSBOT_")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the progressbot wheel (no extras) installed; dependencies come from pip."""
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy of what the distribution ships, so the build leaves nothing in the source tree.
    src = root / "src"
    src.mkdir()
    for name in ("core", "adapters", "bot"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", root / "dist", src], cwd=root)
    assert built.returncode == 0, built.stderr
    [wheel] = (root / "dist").glob("progressbot-*.whl")
    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", venv], cwd=root)
    assert made.returncode == 0, made.stderr
    installed = _run(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", wheel], cwd=root, env=_clean_env()
    )
    assert installed.returncode == 0, installed.stderr
    return venv


def _config(tmp_path: Path, *lines: str) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text("\n".join(["[database]", f'url = "sqlite:///{tmp_path}/pb.db"', *lines]) + "\n")
    return cfg


@pytest.mark.slow
def test_wheel_in_a_clean_venv_runs_the_demo_and_the_client(clean_venv: Path, tmp_path: Path) -> None:
    """Without any extra: the console demo on SQLite runs to the end, and the Python client imports."""
    cfg = _config(tmp_path)
    env = _clean_env(PROGRESSBOT_CONFIG=str(cfg))
    demo = _run(
        [clean_venv / "bin" / "progressbot", "run", "--demo", "1", "--exit-when-done"],
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "completed" in demo.stdout, demo.stdout
    client = _run(
        [clean_venv / "bin" / "python", "-c", "from bot.client import ProgressClient"], cwd=tmp_path, env=env
    )
    assert client.returncode == 0, client.stderr
    # The packages come from the venv, not from the source tree, and carry their type hints.
    where = _run(
        [
            clean_venv / "bin" / "python",
            "-c",
            "import core, pathlib; print(pathlib.Path(core.__file__).parent)",
        ],
        cwd=tmp_path,
        env=env,
    )
    pkg = Path(where.stdout.strip())
    assert pkg.is_relative_to(clean_venv) and (pkg / "py.typed").exists()
    # The extras' libraries were not installed.
    for module in ("nio", "discord", "psycopg"):
        probe = _run([clean_venv / "bin" / "python", "-c", f"import {module}"], cwd=tmp_path, env=env)
        assert probe.returncode != 0, f"{module} should not be installed without its extra"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lines", "env_extra", "extra"),
    [
        (
            ["[matrix]", 'homeserver = "http://127.0.0.1:9"', 'user_id = "@bot:localhost"'],
            {"PROGRESSBOT_MATRIX__ACCESS_TOKEN": "x"},
            "matrix",
        ),
        (["[discord]", "guild_ids = [1]"], {"PROGRESSBOT_DISCORD__TOKEN": "x"}, "discord"),
        ([], {"PROGRESSBOT_DATABASE__URL": "postgresql://nobody@127.0.0.1:9/none"}, "postgres"),
    ],
    ids=["matrix", "discord", "postgres"],
)
def test_a_missing_extra_names_the_one_to_install(
    clean_venv: Path, tmp_path: Path, lines: list[str], env_extra: dict[str, str], extra: str
) -> None:
    """A configured platform or database whose extra is missing: one readable line, exit 1, no traceback."""
    cfg = _config(tmp_path, *lines)
    env = _clean_env(PROGRESSBOT_CONFIG=str(cfg), **env_extra)
    res = _run([clean_venv / "bin" / "progressbot", "run"], cwd=tmp_path, env=env, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"pip install 'progressbot[{extra}]'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_cli_refuses_to_start_when_another_distribution_shadows_a_package(tmp_path: Path) -> None:
    """Another installed distribution that also provides ``core``: the CLI says which one, and exits 2."""
    site = tmp_path / "site"
    info = site / "othercore-2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: othercore\nVersion: 2.0\n")
    (info / "top_level.txt").write_text("core\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(site)]))
    res = _run([sys.executable, "-m", "bot.cli", "jobs"], cwd=tmp_path, env=env, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "'core' is also installed by othercore" in res.stderr, res.stderr
    assert "own virtual environment" in res.stderr
    # Without the other distribution the same command starts normally.
    env["PYTHONPATH"] = str(REPO)
    env["PROGRESSBOT_CONFIG"] = str(_config(tmp_path))
    ok = _run([sys.executable, "-m", "bot.cli", "jobs"], cwd=tmp_path, env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
