"""A worker process for the PostgreSQL tests: ``python -m tests.integration.pg_worker --url URL --effects F``.

It runs a :class:`ProgressService` without a monitor poll (like ``progressbot worker``) and with handlers
that record their side effects by appending one line per effect to a file opened with ``O_APPEND``
(each ``write`` of a short line is atomic, so lines of concurrent processes never interleave):

* ``count``: ``run <job id> <pid>`` once per execution.
* ``slow``: ``start <job id> <pid> <first step> <t>``, then per step (after the checkpoint that may stop
  it) ``step <job id> <pid> <step> <t>``, and ``end <job id> <pid> <t>``. ``t`` is ``time.monotonic_ns()``,
  one clock for every process on the machine, so the tests can order runs across processes.

It prints ``ready <worker id>`` once it claims, and stops gracefully on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import Any

from core.builtin import register_builtins
from core.context import JobContext
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig


class Effects:
    """Appends side-effect lines to a file, atomically per line."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, *fields: object) -> None:
        """Append one line."""
        os.write(self.fd, (" ".join(str(f) for f in fields) + "\n").encode())


def build_registry(effects: Effects) -> HandlerRegistry:
    """The test handlers (see the module doc)."""
    reg = HandlerRegistry()
    pid = os.getpid()

    @reg.handler("count")
    async def count(ctx: JobContext, data: dict[str, Any]) -> None:
        effects.record("run", ctx.job_id, pid)

    @reg.handler("slow")
    async def slow(ctx: JobContext, data: dict[str, Any]) -> dict[str, Any]:
        steps = int(data.get("steps", 10))
        step_ms = int(data.get("step_ms", 200))
        first = int((ctx.checkpoint_state or {}).get("next", 0))
        effects.record("start", ctx.job_id, pid, first, time.monotonic_ns())
        for i in range(first, steps):
            # The checkpoint comes before the step's effect: a worker that lost the job stops here.
            await ctx.checkpoint({"next": i})
            effects.record("step", ctx.job_id, pid, i, time.monotonic_ns())
            ctx.report(i + 1, steps, f"step {i + 1}/{steps}")
            await asyncio.sleep(step_ms / 1000)
        await ctx.checkpoint({"next": steps})
        effects.record("end", ctx.job_id, pid, time.monotonic_ns())
        return {"first": first}

    return reg


async def main(args: argparse.Namespace) -> None:
    """Run the worker until SIGTERM/SIGINT."""
    effects = Effects(args.effects)
    reg = build_registry(effects)
    svc = ProgressService(
        ServiceConfig(
            database_url=args.url,
            concurrency=args.concurrency,
            lease_seconds=args.lease,
            poll_interval=args.poll,
            min_interval=0.1,
            recovery=args.recovery,
            shutdown_grace=2.0,
            notify=not args.no_notify,
            watch_others=False,
        ),
        registry=reg,
    )
    register_builtins(reg, lambda: svc.store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await svc.start()
    assert svc.worker is not None
    print("ready", svc.worker.worker_id, flush=True)
    try:
        await stop.wait()
    finally:
        await svc.stop()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--effects", required=True)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--lease", type=float, default=10.0)
    ap.add_argument("--poll", type=float, default=0.2)
    ap.add_argument("--recovery", choices=["pause", "requeue"], default="requeue")
    ap.add_argument("--no-notify", action="store_true")
    return ap.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args(sys.argv[1:])))
