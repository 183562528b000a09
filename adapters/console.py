"""The console adapter: live progress lines in the terminal, and the chat commands typed at a prompt.

It needs no account or server; ``progressbot run`` uses it when no chat platform is configured.
On a terminal it draws one live line per job with rich; otherwise it prints a line per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import IO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from core.events import JobProgressEvent
from core.service import ProgressService

from .base import ChatAdapter
from .commands import Actor, CommandRouter
from .render import render_line

log = logging.getLogger(__name__)


class ConsoleAdapter(ChatAdapter):
    """Shows every job and batch as a live line; reads commands such as ``pause 3`` from stdin."""

    platform = "console"

    def __init__(
        self,
        service: ProgressService,
        router: CommandRouter,
        *,
        stream: IO[str] | None = None,
        stdin: IO[str] | None = None,
        interactive: bool | None = None,
        keep_finished: int = 10,
    ) -> None:
        super().__init__(service, router)
        self.stream = stream or sys.stdout
        self.stdin = stdin or sys.stdin
        self.console = Console(file=self.stream, highlight=False, soft_wrap=True)
        tty = self.console.is_terminal
        self.live_mode = tty
        self.interactive = interactive if interactive is not None else (tty and self.stdin.isatty())
        self.keep_finished = keep_finished
        self._lines: dict[tuple[str, int | str], tuple[int, str, bool]] = {}
        self._printed: dict[tuple[str, int | str], str] = {}
        self._live: Live | None = None
        self._reader_installed = False
        self._tasks: set[asyncio.Task[str]] = set()
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Start the live display and, on a terminal, the command prompt."""
        if self.live_mode:
            self._live = Live(self._renderable(), console=self.console, refresh_per_second=8, transient=False)
            self._live.start()
        self.listen()
        if self.interactive:
            self._install_reader()
            self.console.print(
                "[dim]Type commands such as 'jobs', 'pause 3', 'run demo.count steps=5' or 'help'.[/]"
            )

    async def stop(self) -> None:
        """Stop reading and drawing."""
        self.unlisten()
        if self._reader_installed:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.stdin.fileno())
            self._reader_installed = False
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._live is not None:
            self._live.update(self._renderable(), refresh=True)
            self._live.stop()
            self._live = None

    def on_event(self, ev: JobProgressEvent) -> None:
        """Update the job's line."""
        if not self.wants_message(ev):
            return
        key = ev.key
        line = render_line(ev)
        old = self._lines.get(key)
        if old is not None and old[0] > ev.seq:
            return
        self._lines[key] = (ev.seq, line, ev.terminal)
        self._trim()
        if self._live is not None:
            self._live.update(self._renderable())
        elif self._printed.get(key) != line:
            self._printed[key] = line
            self.console.print(Text(line))

    def _trim(self) -> None:
        finished = [k for k, v in self._lines.items() if v[2]]
        for k in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._lines[k]
            self._printed.pop(k, None)

    def _renderable(self) -> Group:
        rows = [Text(line) for _, line, _ in sorted(self._lines.values(), key=lambda v: v[0])]
        return Group(*rows) if rows else Group(Text("No jobs yet.", style="dim"))

    # ------------------------------------------------------------ commands
    def _install_reader(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(self.stdin.fileno(), self._on_stdin)
            self._reader_installed = True
        except (NotImplementedError, ValueError, OSError):
            log.info("stdin cannot be watched; console commands are off")

    def _on_stdin(self) -> None:
        line = self.stdin.readline()
        if not line:
            # EOF: stop watching stdin, keep running.
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.stdin.fileno())
            self._reader_installed = False
            return
        text = line.strip()
        if text:
            task = asyncio.create_task(self.handle_line(text))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def handle_line(self, text: str) -> str:
        """Run one typed command (no prefix needed) and print the reply."""
        name, _, rest = text.lstrip(self.router.prefix).partition(" ")
        actor = Actor(user_id="console", platform="console", room="console", is_moderator=True)
        reply = await self.router.dispatch(name.lower(), rest.strip(), actor)
        out = reply.text
        if self._live is not None:
            self._live.console.print(Text(out, style="" if reply.ok else "red"))
        else:
            self.console.print(Text(out))
        return out
