"""The engine's public API as a handler author and an embedding application meet it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import core

REPO = Path(__file__).resolve().parents[2]


def test_the_package_exports_what_handlers_and_embedders_use_and_no_internals() -> None:
    for name in (
        "handler",
        "JobContext",
        "ProgressService",
        "ActionResult",
        "BatchSummary",
        "JobView",
        "JobRef",
    ):
        assert name in core.__all__ and getattr(core, name) is not None
    internals = ("EventBus", "JobProgressMonitor", "Subscription", "ProgressState", "MessageBinding")
    for internal in (*internals, "DirectRun", "default_registry"):
        assert internal not in core.__all__
    assert (REPO / "core" / "py.typed").exists()


@pytest.mark.slow
def test_the_handler_decorator_ties_the_payload_model_to_the_function_type(tmp_path: Path) -> None:
    """mypy, as a handler author runs it: the right payload type passes, a wrong one is an error, and the
    decorated function keeps its type."""
    from mypy import api

    src = tmp_path / "handlers.py"
    src.write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel
            from core import HandlerRegistry, JobContext

            class Build(BaseModel):
                site: str

            class Other(BaseModel):
                n: int

            reg = HandlerRegistry()

            @reg.handler("build", payload=Build)
            async def build(ctx: JobContext, data: Build) -> int:
                return len(data.site)

            @reg.handler("plain")
            async def plain(ctx: JobContext, data: dict[str, object]) -> None:
                return None

            @reg.handler("wrong", payload=Build)
            async def wrong(ctx: JobContext, data: Other) -> None:  # the model says Build
                return None

            reveal_type(build)
            """
        )
    )
    out, _err, status = api.run(
        [str(src), "--cache-dir", str(tmp_path / ".mypy"), "--ignore-missing-imports"]
    )
    lines = out.splitlines()
    errors = [line for line in lines if ": error:" in line]
    assert status == 1 and len(errors) == 1, out
    assert "handlers.py:21:" in errors[0] and "Other" in errors[0] and "Build" in errors[0], out
    revealed = next(line for line in lines if "Revealed type" in line)
    assert "JobContext" in revealed and "handlers.Build" in revealed and "Coroutine" in revealed, revealed
