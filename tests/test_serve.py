"""Serving: Triton model repositories served by a real tritonserver (the nvidia-pytriton wheel's,
2.51, in the serving environment `make test-serve` builds: its Python backend needs numpy < 2),
on 127.0.0.1 with free ports, bounded in requests and time. The client side runs here."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from eclipse_export.serve import client as triton_client
from eclipse_export.serve.limits import ServeLimits
from eclipse_export.serve.server import SHM_DIR, TritonServer, free_port
from eclipse_export.serve.triton_repo import TritonRepoOptions, write_repository

ROOT = Path(__file__).resolve().parent.parent
# tiny bundle, 64x64, 2 steps: the requests cost ~0.1 s of CPU each
LIMITS = ServeLimits(max_batch=4, max_steps=8, max_size=256, default_size=64, default_steps=2)
STEPS, SIZE = 2, 64
LOAD_CLIENTS, WARM_SECONDS, LOAD_SECONDS, STAGES_SECONDS = 8, 5.0, 15.0, 8.0

pytestmark = pytest.mark.slow


def serve_python() -> str:
    """The serving environment's interpreter (ECLIPSE_SERVE_PYTHON, else .venv-serve). Missing is
    a failure: `make test` builds it (make test-serve)."""
    found = os.environ.get("ECLIPSE_SERVE_PYTHON") or str(ROOT / ".venv-serve" / "bin" / "python")
    assert Path(found).exists(), f"no serving environment at {found}: run make test-serve (it creates .venv-serve)"
    return found


def _repo(bundle: Path, out: Path, layout: str) -> Path:
    return write_repository(bundle, out, TritonRepoOptions(layout=layout, limits=LIMITS, threads=1), log=lambda m: None)


def _start(repo: Path, log: Path) -> TritonServer:
    server = TritonServer(repo, python=serve_python(), log=open(log, "w"))
    server.start(ready_timeout_s=180)
    return server


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    """What the runtime's Pipeline gives for the seeds the tests use."""
    from eclipse_export.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(tiny_bundle)
    return {seed: pipe.generate("a red cube", height=SIZE, width=SIZE, steps=STEPS, seed=seed).images[0]
            for seed in range(LOAD_CLIENTS)}


@pytest.fixture(scope="module")
def single(tiny_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    server = _start(_repo(tiny_bundle, tmp / "repo", "single"), tmp / "server.log")
    yield server
    server.stop()


def _generate(server: TritonServer, protocol: str, seed: int, **fields) -> np.ndarray:
    url = server.http_url if protocol == "http" else server.grpc_url
    client = triton_client.connect(url, protocol)
    try:
        fields = {"steps": STEPS, "height": SIZE, "width": SIZE, **fields}
        return triton_client.generate(client, protocol, fields.pop("prompt", "a red cube"), seed=seed, **fields)
    finally:
        client.close()


def _metrics(server: TritonServer, model: str, requests: float, timeout_s: float = 10.0) -> dict:
    """The model's counters once they count `requests` requests (they are updated just after the
    responses are sent)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = triton_client.model_metrics(server.metrics_url).get(model, {})
        if found.get("nv_inference_request_success", 0) >= requests or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _stub_rss(server: TritonServer) -> int:
    """Resident bytes of the server's Python-backend stub processes (the models run there)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == server.process.pid:  # ppid
            status = (stat.parent / "status").read_text()
            total += int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
    return total


def test_repository_layout(tiny_bundle, tmp_path):
    single = (_repo(tiny_bundle, tmp_path / "single", "single") / "eclipse" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in single and "dynamic_batching" in single and "count: 1 kind: KIND_CPU" in single
    repo = _repo(tiny_bundle, tmp_path / "repo", "stages")
    config = (repo / "eclipse" / "config.pbtxt").read_text()
    # the BLS model: one request per instance, as many instances as a batch holds; the stage
    # models batch
    assert "max_batch_size: 4" in config and "count: 4 kind: KIND_CPU" in config and "dynamic_batching" not in config
    assert "dynamic_batching" in (repo / "eclipse_unet" / "config.pbtxt").read_text()
    assert 'string_value: "eclipse/bundle"' in config
    for name in ("PROMPT", "NEGATIVE_PROMPT", "SEED", "STEPS", "GUIDANCE", "HEIGHT", "WIDTH", "IMAGE"):
        assert f'name: "{name}"' in config
    # the bundle is inside the repository, hard-linked (same file system here), whole
    assert (repo / "eclipse" / "bundle" / "manifest.json").stat().st_ino == (tiny_bundle / "manifest.json").stat().st_ino
    for component in ("text_encoder", "prior", "unet", "movq"):
        assert (repo / f"eclipse_{component}" / "config.pbtxt").is_file()
    serve = json.loads((repo / "eclipse" / "serve.json").read_text())
    assert serve["layout"] == "stages" and serve["limits"]["max_steps"] == LIMITS.max_steps
    from eclipse_export.serve.triton_repo import RepositoryError

    with pytest.raises(RepositoryError, match="exists"):
        _repo(tiny_bundle, repo, "single")


def test_stages_with_tritons_own_backends(tiny_bundle, tmp_path):
    """Where the server has them (NVIDIA's containers; not the wheel): the graphs as onnxruntime
    models. Written and checked here; served only where such a server is."""
    from eclipse_export.serve.triton_repo import RepositoryError

    repo = write_repository(tiny_bundle, tmp_path / "repo", TritonRepoOptions(layout="stages", stage_backend="onnxruntime"),
                            log=lambda m: None)
    unet = repo / "eclipse_unet"
    config = (unet / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config and "max_batch_size: 0" in config
    assert 'name: "timestep" data_type: TYPE_FP32 dims: [1]' in config
    assert (unet / "1" / "model.onnx").stat().st_ino == (tiny_bundle / "unet.onnx").stat().st_ino
    assert json.loads((repo / "eclipse" / "serve.json").read_text())["stage_batching"] is False
    with pytest.raises(RepositoryError, match="tensorrt backend loads TensorRT engines"):
        write_repository(tiny_bundle, tmp_path / "trt", TritonRepoOptions(layout="stages", stage_backend="tensorrt"))
    with pytest.raises(RepositoryError, match="stages only"):
        write_repository(tiny_bundle, tmp_path / "x", TritonRepoOptions(stage_backend="onnxruntime"))
    assert not (tmp_path / "trt").exists() and not (tmp_path / "x").exists()


def test_cli_writes_repository_without_torch(tiny_bundle, tmp_path):
    out = tmp_path / "repo"
    code = ("import sys; from eclipse_export.cli.export import export_main; "
            f"rc = export_main(['--from-bundle', {str(tiny_bundle)!r}, '--target', 'triton', '--out', {str(out)!r}, "
            "'--triton-max-batch', '2']); "
            "assert 'torch' not in sys.modules, 'the triton target imported torch'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "max_batch_size: 2" in (out / "eclipse" / "config.pbtxt").read_text()
    bad = subprocess.run([sys.executable, "-m", "eclipse_export.cli.export", "--target", "triton", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and bad.stderr.startswith("error: --target triton takes --from-bundle")


def test_http_and_grpc_give_the_pipelines_pixels(single, reference):
    for protocol in ("http", "grpc"):
        image = _generate(single, protocol, seed=3)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        assert np.array_equal(image, reference[3]), protocol


def test_a_request_of_several_rows(single, reference):
    """Rows of one request are prompts of their own (each with its seed); mixed sizes are refused."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    def request(heights):
        rows = len(heights)
        values = [("PROMPT", np.array([[b"a red cube"]] * rows, dtype=object), "BYTES"),
                  ("SEED", np.arange(rows, dtype=np.uint64).reshape(rows, 1), "UINT64"),
                  ("STEPS", np.full((rows, 1), STEPS, np.int32), "INT32"),
                  ("HEIGHT", np.array(heights, np.int32).reshape(rows, 1), "INT32")]
        inputs = []
        for name, array, dtype in values:
            inputs.append(http.InferInput(name, list(array.shape), dtype))
            inputs[-1].set_data_from_numpy(array)
        client = http.InferenceServerClient(single.http_url)
        try:
            return client.infer("eclipse", inputs).as_numpy("IMAGE")
        finally:
            client.close()

    images = request([SIZE] * 3)
    assert images.shape == (3, SIZE, SIZE, 3)
    for seed in range(3):
        assert np.array_equal(images[seed], reference[seed])
    with pytest.raises(InferenceServerException, match="same HEIGHT and WIDTH"):
        request([SIZE, 2 * SIZE])


def test_bad_requests_are_refused_and_the_model_keeps_serving(single, reference):
    from tritonclient.utils import InferenceServerException

    cases = [
        ({"steps": 0}, "STEPS 0 is outside 1..8"),
        ({"steps": 1000}, "STEPS 1000 is outside 1..8"),
        ({"height": 100}, "HEIGHT 100 is not a multiple of 64"),
        ({"width": 4096}, "WIDTH 4096 is outside 64..256"),
        ({"guidance": float("nan")}, "GUIDANCE nan is outside"),
        ({"prompt": "x" * 3000}, "PROMPT is 3000 bytes; at most 2048"),
    ]
    for fields, message in cases:
        for protocol in ("http", "grpc"):
            with pytest.raises(InferenceServerException) as caught:
                _generate(single, protocol, seed=0, **fields)
            assert message in caught.value.message(), (fields, caught.value.message())
    assert np.array_equal(_generate(single, "http", seed=1), reference[1])
    assert single.process.poll() is None


def _load(server: TritonServer, reference: dict, seconds: float) -> tuple[list[float], list[str], list[int], float]:
    """LOAD_CLIENTS clients, each sending its own seed's request again and again for `seconds`:
    (latencies, failures, seeds whose image differed from the pipeline's, elapsed)."""
    latencies: list[float] = []
    failures: list[str] = []
    mismatches: list[int] = []
    stop_at = time.monotonic() + seconds

    def client_loop(seed: int) -> None:
        client = triton_client.connect(server.http_url, "http")
        try:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    image = triton_client.generate(client, "http", "a red cube", seed=seed, steps=STEPS,
                                                   height=SIZE, width=SIZE)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    failures.append(repr(e))
                    continue
                latencies.append(time.perf_counter() - t0)
                if not np.array_equal(image, reference[seed]):
                    mismatches.append(seed)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(seed,)) for seed in range(LOAD_CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    return latencies, failures, mismatches, time.perf_counter() - t0


def test_concurrent_clients_batch_without_failures_or_memory_growth(single, reference, capsys):
    # a first round brings every batch size's buffers into the allocators; growth is measured after it
    _, failures, _, _ = _load(single, reference, WARM_SECONDS)
    assert not failures, failures[:3]
    before = _metrics(single, "eclipse", 0)
    rss_before = _stub_rss(single)
    latencies, failures, mismatches, elapsed = _load(single, reference, LOAD_SECONDS)
    assert not failures, failures[:3]
    assert not mismatches, f"batched rows differ from the pipeline's image for seeds {sorted(set(mismatches))}"
    done = len(latencies)
    after = _metrics(single, "eclipse", before.get("nv_inference_request_success", 0) + done)
    requests = after["nv_inference_request_success"] - before.get("nv_inference_request_success", 0)
    executions = after["nv_inference_exec_count"] - before.get("nv_inference_exec_count", 0)
    assert requests == done
    assert executions < requests, "the dynamic batcher never merged requests"
    rss_after = _stub_rss(single)
    q = statistics.quantiles(latencies, n=20)
    with capsys.disabled():
        print(f"\n[triton single, {LOAD_CLIENTS} clients, {elapsed:.1f} s] {done} requests, {done / elapsed:.2f} req/s, "
              f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {q[18] * 1000:.0f} ms, "
              f"{requests / executions:.2f} requests per execution, stub RSS {rss_before / 2**20:.1f} -> "
              f"{rss_after / 2**20:.1f} MiB")
    # no growth with the number of requests (allocator noise of a few MiB allowed)
    assert rss_after - rss_before < 4 * 2**20, (rss_before, rss_after)


def test_stages_layout_gives_the_single_layouts_pixels(tiny_bundle, tmp_path, reference, capsys):
    server = _start(_repo(tiny_bundle, tmp_path / "repo", "stages"), tmp_path / "server.log")
    try:
        assert np.array_equal(_generate(server, "grpc", seed=2), reference[2])
        # concurrent requests, each in its own pipeline-model instance: do their UNet steps share
        # executions of the UNet model? (recorded in docs/decisions.md "Serving")
        before = _metrics(server, "eclipse_unet", STEPS)
        latencies, failures, mismatches, elapsed = _load(server, reference, STAGES_SECONDS)
        assert not failures and not mismatches, (failures[:3], mismatches)
        unet = _metrics(server, "eclipse_unet", before["nv_inference_request_success"] + len(latencies) * STEPS)
        calls = unet["nv_inference_request_success"] - before["nv_inference_request_success"]
        executions = unet["nv_inference_exec_count"] - before["nv_inference_exec_count"]
        assert calls == len(latencies) * STEPS
        with capsys.disabled():
            print(f"\n[triton stages, {LOAD_CLIENTS} clients, {elapsed:.1f} s] {len(latencies)} requests, "
                  f"{len(latencies) / elapsed:.2f} req/s, p50 {statistics.median(latencies) * 1000:.0f} ms; UNet: "
                  f"{calls:.0f} step calls in {executions:.0f} executions ({calls / executions:.2f} per execution)")
    finally:
        assert server.stop() == 0
        assert not server.removed_shm


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_eclipse_serve_stops_cleanly(tiny_bundle, tmp_path, how):
    repo = _repo(tiny_bundle, tmp_path / "repo", "single")
    shm_before = set(os.listdir(SHM_DIR))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "eclipse_export.cli.serve", "--repository", str(repo),
                             "--python", serve_python(), "--http-port", str(port), "--grpc-port", str(free_port()),
                             "--metrics-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if line.startswith("ready:") or not line:
                break
        assert lines[-1].startswith("ready:"), "".join(lines[-20:])
        client = triton_client.connect(f"127.0.0.1:{port}")
        assert client.is_model_ready("eclipse")
        client.close()
        proc.send_signal(how)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "tritonserver stopped (status 0)" in err and "removed" not in err, err[-2000:]
    new = {name for name in set(os.listdir(SHM_DIR)) - shm_before if name.startswith("eclipse-serve-")}
    assert not new, new
    docker = subprocess.run([sys.executable, "-m", "eclipse_export.cli.serve", "--repository", str(repo), "--docker",
                             "--jetson"], capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert docker.returncode == 0 and "tritonserver:24.10-py3-igpu" in docker.stdout
