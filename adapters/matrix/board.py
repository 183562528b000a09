"""The Matrix format of a room board (:mod:`adapters.board`): one ``m.notice``, plain text plus HTML.

The board carries no control reactions (a reaction cannot say which job it means): people use the
commands by id (``!pause 12``), as for any job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from ..board import BoardPolicy, BoardView, RoomBoards, board_html, board_plain
from ..driver import Content, ProgressDriver
from .content import HTML_FORMAT, edit_content
from .transport import MAX_CONTENT_BYTES

#: An event id as long as any Synapse hands out, to measure an edit's size before it has a target.
_SAMPLE_EVENT_ID = "$" + "x" * 60


def board_content(view: BoardView) -> Content:
    """The notice showing ``view``; ``m.mentions`` is empty: a board never pings anyone."""
    body = board_plain(view)
    content = {
        "msgtype": "m.notice",
        "body": body,
        "format": HTML_FORMAT,
        "formatted_body": board_html(view),
        "m.mentions": {},
    }
    return Content(content, body)


def board_fits(content: Content) -> bool:
    """Whether an edit showing ``content`` (which carries the text twice) stays under Synapse's limit."""
    edit = edit_content(_SAMPLE_EVENT_ID, content.payload)
    return len(json.dumps(edit).encode()) <= MAX_CONTENT_BYTES


def matrix_boards(
    driver: ProgressDriver, policy: BoardPolicy, *, clock: Callable[[], float] = time.monotonic
) -> RoomBoards:
    """Room boards in the Matrix format for ``driver``."""
    return RoomBoards(driver, policy, board_content, board_fits, clock=clock)
