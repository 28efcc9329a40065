"""The console's progress board: trials post progress lines within long epochs, the driver's
console takes them. Its own small module, importing neither torch nor the loop: the board runs as
a Ray actor whose worker imports this module alone."""
from __future__ import annotations

import contextlib
from typing import Callable


class ProgressBoard:
    """The driver's board of progress lines, run as a Ray actor beside the driver: trials post
    (trial id, line) without waiting, the console takes what has come in. Bounded: when full, the
    oldest lines are kept and later ones dropped (a line is a glance, never a record)."""

    def __init__(self, maxsize: int = 1000) -> None:
        self.maxsize, self.lines = maxsize, []

    def post(self, item: tuple[str, str]) -> None:
        if len(self.lines) < self.maxsize:
            self.lines.append(item)

    def take(self) -> list[tuple[str, str]]:
        lines, self.lines = self.lines, []
        return lines


def post_to(board, trial_id: str) -> Callable[[str], None] | None:
    """Progress lines into the driver's board (a ProgressBoard actor), tagged with the trial; fire
    and forget: a trial never waits on its console, nor fails when the board is gone. No board
    (--verbose: Tune's own output), nothing to post to: None."""
    if board is None:
        return None

    def post(line: str) -> None:
        with contextlib.suppress(Exception):  # the board gone with its driver
            board.post.remote((trial_id, line))

    return post
