"""The Ray Serve app, run by the serving environment's interpreter (`make test-serve` installs
ray[serve] there; the shared test environment does not carry Ray): 2 CPU replicas on 127.0.0.1,
the same pixels as the runtime's Pipeline, refused requests, a bounded load run, a clean stop."""

from __future__ import annotations

import io
import json
import os
import signal
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from eclipse_export.serve.server import free_port
from tests.test_serve import LOAD_CLIENTS, ROOT, SIZE, STEPS, reference, serve_python  # noqa: F401 - fixture

LOAD_SECONDS = 10.0
pytestmark = pytest.mark.slow


def _post(url: str, body: dict) -> tuple[int, bytes, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read(), r.headers  # case-insensitive
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_ray_serve_app(tiny_bundle, reference, capsys):  # noqa: F811 - the fixture imported above
    python = serve_python()
    port = free_port()
    proc = subprocess.Popen([python, "-m", "eclipse_export.serve.ray_app", "--bundle", str(tiny_bundle), "--replicas", "2",
                             "--port", str(port), "--threads", "1", "--max-steps", "8", "--max-size", "256",
                             "--default-size", str(SIZE), "--default-steps", str(STEPS)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"})
    url = f"http://127.0.0.1:{port}/generate"
    try:
        t0 = time.monotonic()
        lines = []
        while time.monotonic() - t0 < 240:
            line = proc.stderr.readline()
            lines.append(line)
            if line.startswith("ready:") or not line:
                break
        assert lines[-1].startswith("ready:"), "".join(lines[-30:])
        startup = time.monotonic() - t0
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained

        status, data, headers = _post(url, {"prompt": "a red cube", "seed": 5})
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert np.array_equal(_png(data), reference[5])
        for body, message in (({"prompt": "x", "steps": 99}, "STEPS 99 is outside 1..8"),
                              ({"prompt": "x", "bundle": "/etc"}, "unknown field(s) bundle"),
                              ({"seed": 1}, "prompt is required")):
            status, data, _ = _post(url, body)
            assert status == 400 and message in json.loads(data)["error"], data

        latencies, failures, batches, mismatches = [], [], [], []
        stop_at = time.monotonic() + LOAD_SECONDS

        def client(seed: int) -> None:
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                status, data, headers = _post(url, {"prompt": "a red cube", "seed": seed})
                if status != 200:
                    failures.append((status, data[:200]))
                    continue
                latencies.append(time.perf_counter() - t)
                batches.append(int(headers["X-Eclipse-Batch"]))
                if not np.array_equal(_png(data), reference[seed]):
                    mismatches.append(seed)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(LOAD_CLIENTS)]
        t1 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(LOAD_SECONDS + 120)
        elapsed = time.perf_counter() - t1
        assert not failures and not mismatches, (failures[:3], mismatches)
        q = statistics.quantiles(latencies, n=20)
        with capsys.disabled():
            print(f"\n[ray serve, 2 replicas, {LOAD_CLIENTS} clients, {elapsed:.1f} s] ready after {startup:.0f} s; "
                  f"{len(latencies)} requests, {len(latencies) / elapsed:.2f} req/s, p50 "
                  f"{statistics.median(latencies) * 1000:.0f} ms, p95 {q[18] * 1000:.0f} ms, mean batch "
                  f"{statistics.mean(batches):.2f}")
        assert statistics.mean(batches) > 1, "@serve.batch never merged requests"
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
