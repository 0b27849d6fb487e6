"""Long work prints a line at least every HEARTBEAT_SECONDS (10 s), even inside one library call."""

from __future__ import annotations

import time

import pytest

import eclipse_export.export.exporter as export_mod
import eclipse_export.util.progress as progress_mod
from eclipse_export.util.progress import heartbeat


def test_heartbeat_fills_silent_gaps_and_stops_with_the_block():
    stamped = []

    def log(message):
        stamped.append((time.monotonic(), message))

    with heartbeat(log, every=0.5) as tracked:
        tracked("[1/5] unet")
        time.sleep(1.8)  # one silent library call
        tracked("[2/5] movq")
        time.sleep(0.2)
    ended = time.monotonic()
    time.sleep(0.6)
    beats = [m for _, m in stamped if "still at" in m]
    assert len(beats) >= 3 and all("[1/5] unet" in m for m in beats[:3]), stamped
    times = [t for t, _ in stamped] + [ended]
    assert max(b - a for a, b in zip(times, times[1:])) <= 0.5 + 0.1  # scheduling slack only
    assert stamped[-1][0] <= ended  # nothing after the block


def test_export_prints_while_a_phase_is_silent(tmp_path, monkeypatch):
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.sources import RandomSource

    def slow(source, component, workdir, options, log):
        time.sleep(0.7)
        raise RuntimeError("stop here")

    monkeypatch.setattr(progress_mod, "HEARTBEAT_SECONDS", 0.25)
    monkeypatch.setattr(export_mod, "export_component", slow)
    lines = []
    with pytest.raises(RuntimeError, match="stop here"):
        export_bundle(RandomSource("tiny"), tmp_path / "b", ExportOptions(), log=lines.append)
    assert any("still at: [1/5] text_encoder" in line for line in lines), lines
