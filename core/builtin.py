"""Built-in handlers: ``demo.count`` (for the README demo and the tests) and ``maintenance.cleanup``."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .context import JobContext
from .registry import HandlerRegistry, default_registry

#: The longest a ``demo.count`` job may count, all steps together: a demo, not a way to fill the queue.
DEMO_MAX_SECONDS = 3600


class DemoCount(BaseModel):
    """Payload of ``demo.count``."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(20, ge=1, le=100_000, description="how many steps to count")
    delay_ms: int = Field(500, ge=0, le=60_000, description="how long each step takes")
    fail_at: int | None = Field(None, ge=1, le=100_000, description="fail when reaching this step (1-based)")

    @model_validator(mode="after")
    def _bounded_duration(self) -> DemoCount:
        # Each field alone is sane, but 100,000 steps of a minute would occupy a worker slot for months.
        if self.steps * self.delay_ms > DEMO_MAX_SECONDS * 1000:
            raise ValueError(f"steps × delay_ms must stay within {DEMO_MAX_SECONDS} seconds")
        return self


class Cleanup(BaseModel):
    """Payload of ``maintenance.cleanup``."""

    model_config = ConfigDict(extra="forbid")

    older_than_days: float = Field(
        30.0, ge=0, le=36_500, allow_inf_nan=False, description="delete finished jobs older than this"
    )
    vacuum: bool = True


async def demo_count(ctx: JobContext, data: DemoCount) -> dict[str, Any]:
    """Count to ``steps``, one step every ``delay_ms``; checkpoints between steps.

    ``executions`` counts step executions across all of the job's runs: a step interrupted by a crash runs
    again after resume and is counted twice, so ``executions - steps`` is the number of re-run steps.
    """
    state = ctx.checkpoint_state or {}
    start = int(state.get("next", 0))
    executions = int(state.get("executions", 0))
    for i in range(start, data.steps):
        # The pause/cancel point between steps; nothing of step i has happened yet.
        await ctx.checkpoint({"next": i, "executions": executions})
        executions += 1
        # Count the execution durably before doing the work, so a crash mid-step is visible as a re-run.
        await ctx.save({"next": i, "executions": executions})
        if data.delay_ms:
            await asyncio.sleep(data.delay_ms / 1000)
        if data.fail_at is not None and i + 1 == data.fail_at:
            raise RuntimeError(f"failed at step {i + 1} (fail_at={data.fail_at})")
        ctx.report(i + 1, data.steps, f"step {i + 1}/{data.steps}")
    await ctx.checkpoint({"next": data.steps, "executions": executions})
    return {"steps": data.steps, "executions": executions}


def make_cleanup(store_getter: Any) -> Any:
    """Build the ``maintenance.cleanup`` handler around a function returning the store."""

    async def maintenance_cleanup(ctx: JobContext, data: Cleanup) -> dict[str, Any]:
        """Delete finished jobs older than N days, then VACUUM SQLite."""
        store = store_getter()
        ctx.stages([("delete", 3), ("vacuum", 1)])
        async with ctx.stage("delete", total=1):
            deleted = await store.cleanup(data.older_than_days)
            ctx.report(1, message=f"deleted {deleted} job(s)")
        if data.vacuum:
            async with ctx.stage("vacuum", total=1):
                await store.vacuum()
                ctx.report(1, message="vacuumed")
        ctx.log("info", f"cleanup deleted {deleted} finished job(s) older than {data.older_than_days:g} days")
        return {"deleted": deleted}

    return maintenance_cleanup


def register_builtins(registry: HandlerRegistry | None, store_getter: Any) -> None:
    """Register the built-in handlers (``maintenance.cleanup`` uses the given store)."""
    reg = registry or default_registry
    reg.register("demo.count", demo_count, payload=DemoCount)
    # Deleting everyone's history is an operator's decision, not a room member's.
    reg.register("maintenance.cleanup", make_cleanup(store_getter), payload=Cleanup, run_by="admins")
