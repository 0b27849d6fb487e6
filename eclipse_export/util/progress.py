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


class StepProgress:
    """Sampling progress as one updating line (`unet  12/20 [####      ] 3.41 step/s, 2.3 s left`)
    on a terminal, tqdm-style, and as a few plain lines (every ~10 %) when the stream is not a
    terminal (logs, CI, pipes), where carriage returns would pile up. Hand-written: the edge
    runtime does not depend on tqdm. Call it as the pipeline's progress(i, n) callback."""

    WIDTH = 20

    def __init__(self, stream, label: str = "unet", tty: bool | None = None):
        self.stream = stream
        self.label = label
        self.tty = stream.isatty() if tty is None else tty
        self.started: float | None = None
        self.last_len = 0

    def __call__(self, i: int, n: int) -> None:
        now = time.monotonic()
        if self.started is None or i <= 1:
            self.started = now  # after the first step: warm-up (CUDA graph capture, JIT) is not speed
        elapsed = now - self.started
        rate = (i - 1) / elapsed if i > 1 and elapsed > 0 else None  # step 1 starts the clock
        if self.tty:
            done = self.WIDTH * i // max(n, 1)
            bar = "#" * done + " " * (self.WIDTH - done)
            speed = f" {rate:.2f} step/s, {(n - i) / rate:.1f} s left" if rate else ""
            line = f"{self.label} {i:>{len(str(n))}}/{n} [{bar}]{speed}"
            self.stream.write("\r" + line + " " * max(0, self.last_len - len(line)) + ("\n" if i == n else ""))
            self.last_len = len(line)
            self.stream.flush()
        elif i == n or i % max(1, n // 10) == 0:
            speed = f" ({rate:.2f} step/s)" if rate else ""
            self.stream.write(f"  {self.label} step {i}/{n}{speed}\n")
            self.stream.flush()
