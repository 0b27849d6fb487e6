"""A heartbeat for long work: no silent gap longer than HEARTBEAT_SECONDS.

Exporting the full-size UNet sits inside single library calls (torch.onnx.export, ONNX's checker,
a TensorRT build) for a minute or more, where nothing of ours can print. `heartbeat` wraps a log
function: whenever nothing was logged for HEARTBEAT_SECONDS, a background thread repeats the last
message with the time spent on it, so a user (or a CI log watcher) sees the work is alive and
where it is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HEARTBEAT_SECONDS = 10.0

Log = Callable[[str], None]


@contextmanager
def heartbeat(log: Log, every: float | None = None, detail: Callable[[], str] | None = None) -> Iterator[Log]:
    """Yields a log function to use instead of `log` inside the block; no two lines written
    through it are more than `every` seconds apart while the block runs. `detail` adds what is
    known of the silent work (e.g. a TensorRT build's current sub-phase) to the repeated line."""
    every = HEARTBEAT_SECONDS if every is None else every
    lock = threading.Lock()
    state = {"message": "", "since": time.monotonic(), "last": time.monotonic()}
    stop = threading.Event()

    def tracked(message: str) -> None:
        with lock:
            now = time.monotonic()
            state.update(message=message.strip(), since=now, last=now)
            log(message)

    poll = every / 5

    def beat() -> None:
        # speak once silent for every - poll, checked each poll: no gap exceeds `every`
        while not stop.wait(poll):
            with lock:
                now = time.monotonic()
                if now - state["last"] >= every - poll:
                    state["last"] = now
                    where = state["message"] or "starting"
                    if detail is not None:
                        where += f" [{detail()}]"
                    log(f"  ... still at: {where} ({now - state['since']:.0f} s)")

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield tracked
    finally:
        stop.set()
        thread.join()
