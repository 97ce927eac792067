"""How far long work has gone, for whoever shows it: the command line's progress bars.

    with listen(lambda stage, done, total, what: bar.update(...)):   # the CLI
        training_flow(cfg)
    report("train", step, max_steps, f"loss {loss:.3f}")              # a task, anywhere below

Nothing listens in a worker or a test: `report` then costs a list lookup. Listeners run in the
reporting thread and must not raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

Listener = Callable[[str, int, int, str], None]  # (stage, done, total, what)
_listeners: list[Listener] = []


def report(stage: str, done: int, total: int, what: str = "") -> None:
    """Tell every listener that `done` of `total` units of `stage` are done."""
    for listener in list(_listeners):  # noqa: PERF101 - a copy: a listener may leave while it runs
        try:
            listener(stage, done, total, what)
        except Exception:  # a display must never break the work it shows
            log.debug("progress listener failed", exc_info=True)


@contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Call `listener` with every report made while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
