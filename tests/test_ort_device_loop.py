"""ONNX Runtime's device loop: IO binding, the guided step as an ONNX graph, static-shape sessions.

No GPU here: the same loop code runs on ONNX Runtime's CPU provider with IO binding (what
differs on a GPU is where ONNX Runtime allocates the OrtValues and the providers' graph option).
The step graph is written into the bundle at export time (export/step_graph.py) and loaded from
it, hash-verified like every file; bundles of format 1 (none in them) run the loop on the host.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from eclipse_export.runtime.backends.base import BackendError
from eclipse_export.runtime.backends.factory import make_backend
from eclipse_export.runtime.backends.onnxruntime import (
    OnnxRuntimeBackend,
    declared_input_shapes,
    free_dimensions,
    ort_cache_dir,
)
from eclipse_export.runtime.backends.ort_errors import ort_error_line
from eclipse_export.runtime.bundle import open_bundle
from eclipse_export.runtime.pipeline import Pipeline
from eclipse_export.runtime.schedulers import StepCoefficients, apply_step
from eclipse_export.export.step_graph import FILES, guided_step_model
from eclipse_export.runtime.backends.ort_device_loop import step_params
from tests.gpu_required import need


def _step_bytes(cfg: bool) -> bytes:
    return guided_step_model(cfg).SerializeToString()


def test_bundles_carry_their_step_graphs(tiny_bundle):
    """Export writes both step graphs into the bundle, listed (so size/hash-verified) under
    `step_graphs`; each is the graph export/step_graph.py builds, and valid ONNX."""
    import onnx

    bundle = open_bundle(tiny_bundle)
    assert bundle.manifest["step_graphs"] == FILES
    for kind, rel in FILES.items():
        assert rel in bundle.manifest["files"]
        model = onnx.load(str(bundle.step_graph_path(kind)))
        onnx.checker.check_model(model, full_check=True)  # incl. shape inference of every node
        assert model.SerializeToString() == _step_bytes(kind == "cfg")
        ops = [n.op_type for n in model.graph.node]
        assert ("Split" in ops) == (kind == "cfg") and "Where" in ops


@pytest.mark.parametrize("cfg", [True, False])
def test_no_clip_takes_its_bounds_from_a_runtime_tensor(cfg):
    """Issue 18 #7: ONNX Runtime's CUDA Clip reads min/max in host memory; bounds computed from
    the device-side params were copied device -> host on every step. Every Clip's bounds must be
    initializers (constants ONNX Runtime keeps on the host), else no Clip at all."""
    pytest.importorskip("onnx")
    model = guided_step_model(cfg)
    constants = {t.name for t in model.graph.initializer}
    runtime_bounds = [(n.name or n.output[0], [i for i in n.input[1:] if i and i not in constants])
                      for n in model.graph.node if n.op_type == "Clip"]
    assert all(not bounds for _, bounds in runtime_bounds), runtime_bounds


@pytest.mark.parametrize("cfg", [True, False])
def test_step_graph_is_apply_step_bit_for_bit(cfg):
    """On ONNX Runtime's CPU provider the graph computes exactly schedulers.apply_step (after
    guidance.combine), NaN propagation and no-clipping (clip = inf) included."""
    import onnxruntime as ort

    from eclipse_export.runtime import guidance

    session = ort.InferenceSession(_step_bytes(cfg), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    b, shape = 2, (2, 4, 6, 10)
    for k in (StepCoefficients(0.31, 0.95, 1.0, 0.52, 0.47, 0.0, 0.11),   # DDPM-like, clipped
              StepCoefficients(0.72, 0.69, float("inf"), 0.8, 0.0, 0.6, 0.0)):  # DDIM-like, no clip
        x = (3 * rng.standard_normal(shape)).astype(np.float32)
        pred = rng.standard_normal(((2 * b if cfg else b), *shape[1:])).astype(np.float32)
        noises = rng.standard_normal((3, *shape)).astype(np.float32)
        x[0, 0, 0, 0] = np.nan
        x[0, 0, 0, 1] = -0.0  # the comparisons keep its sign, as np.clip does
        pred[-1, 1, 2, 3] = np.inf
        latents_next, sample_next = session.run(None, {"noise_pred": pred, "latents": x, "step_noise": noises,
                                                       "params": step_params(k, 5.5 if cfg else None, 2)})
        eps = guidance.combine(pred, 5.5) if cfg else pred
        with np.errstate(invalid="ignore"):
            want = apply_step(k, eps, x, noises[2] if k.std else None)
        np.testing.assert_array_equal(latents_next, want)
        np.testing.assert_array_equal(sample_next, np.concatenate([want, want]) if cfg else want)
        assert np.isnan(latents_next).sum() >= 1  # NaN is carried, not clipped into range


def _generate(pipe, **kw):
    args = dict(prompt=["a red cube", "two blue spheres"], height=128, width=192, steps=5, seed=3, record=True)
    return pipe.generate(**{**args, **kw})


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_device_loop_equals_the_host_loop(tiny_bundle, tiny_pipeline, kind, guidance):
    """Same graphs, same noises: the loop with IO binding and the step graph gives the host loop's
    latents exactly (same kernels on the same inputs), twice in a row (buffers reused)."""
    backend = OnnxRuntimeBackend(["cpu"], device_loop=True, cuda_graphs=False)
    device = Pipeline.from_bundle(tiny_bundle, backend)
    ref = _generate(tiny_pipeline, scheduler=kind, guidance_scale=guidance)
    for _ in range(2):
        got = _generate(device, scheduler=kind, guidance_scale=guidance)
        for key in ("unet.noise_pred_step0", "unet.latents"):
            np.testing.assert_array_equal(got.intermediates[key], ref.intermediates[key])
        np.testing.assert_array_equal(got.images, ref.images)


def test_static_shape_sessions_follow_the_request(tiny_bundle, tiny_pipeline):
    """cuda_graphs: the UNet session is specialised to the request's shapes (what graph capture
    needs), re-made when they change, one at a time; results within the FP32 bounds."""
    backend = OnnxRuntimeBackend(["cpu"], device_loop=True, cuda_graphs=True)
    pipe = Pipeline.from_bundle(tiny_bundle, backend)
    unet = pipe.sessions["unet"]
    assert unet._session is None  # made for the first request's shapes, not at load
    for height, guidance in ((128, 4.0), (64, 4.0), (64, 1.0)):
        ref = _generate(tiny_pipeline, height=height, guidance_scale=guidance)
        got = _generate(pipe, height=height, guidance_scale=guidance)
        batch = 4 if guidance > 1 else 2
        assert unet.static_shapes == {"sample": (batch, 4, height // 8, 24), "timestep": (1,), "image_embeds": (batch, 32)}
        np.testing.assert_allclose(got.intermediates["unet.latents"], ref.intermediates["unet.latents"],
                                   rtol=1e-4, atol=1e-4)
        assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1
    assert not backend.notes


def test_free_dimensions():
    declared = {"sample": ["B", 4, "h", "w"], "timestep": [1], "image_embeds": ["B", 32]}
    assert free_dimensions(declared, {"sample": (2, 4, 8, 16), "timestep": (1,), "image_embeds": (2, 32)}) == \
        {"B": 2, "h": 8, "w": 16}
    with pytest.raises(BackendError, match="both 2 and 3"):
        free_dimensions(declared, {"sample": (2, 4, 8, 16), "image_embeds": (3, 32)})


def test_the_specs_name_the_exported_graphs_free_dimensions(tiny_bundle):
    """Static sessions fix free dimensions by the names the specs give them; an exported graph
    must declare exactly those (ONNX Runtime ignores an override for a name it does not know)."""
    import onnxruntime as ort

    from eclipse_export.families.kandinsky22.components import COMPONENTS

    bundle = open_bundle(tiny_bundle)
    for name, spec in COMPONENTS.items():
        graph = ort.InferenceSession(str(bundle.graph_path(name)), providers=["CPUExecutionProvider"])
        from_graph = {i.name: [d if isinstance(d, str) else -1 for d in i.shape] for i in graph.get_inputs()}
        assert declared_input_shapes(spec) == from_graph, name


def test_provider_errors_are_one_line_backend_errors():
    import onnxruntime as ort

    with pytest.raises(BackendError, match="unknown provider"):
        make_backend("onnxruntime", providers=["gpu"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendError, match="no cuda provider.*onnxruntime-gpu"):
            make_backend("onnxruntime", providers=["cuda"])
    with pytest.raises(BackendError, match="combines only with cpu"):
        make_backend("onnxruntime", providers=["tensorrt-rtx", "cuda"])
    try:
        import onnxruntime_ep_nv_tensorrt_rtx  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="pip install onnxruntime-ep-nv-tensorrt-rtx"):
            make_backend("onnxruntime", providers=["tensorrt-rtx"])


def test_tensorrt_provider_caches_live_beside_the_bundle(tiny_bundle_copy, tmp_path, monkeypatch):
    """Engine and timing caches go into the bundle (never the working directory); a bundle that
    cannot hold them sends them to the user cache, keyed by the bundle's manifest."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    bundle = open_bundle(tiny_bundle_copy)
    backend = OnnxRuntimeBackend(["cpu"])
    backend.short_providers, backend.providers = ["tensorrt", "cuda"], ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    (trt, trt_opts), (cuda, cuda_opts) = backend._provider_options(bundle, graph_capture=True)
    cache = tiny_bundle_copy / ".ort-cache" / f"tensorrt-ort{backend._ort.__version__}"
    assert trt == "TensorrtExecutionProvider" and cache.is_dir()
    assert trt_opts["trt_engine_cache_path"] == trt_opts["trt_timing_cache_path"] == str(cache)
    assert trt_opts["trt_engine_cache_enable"] == "True" and trt_opts["trt_cuda_graph_enable"] == "True"
    assert cuda_opts == {"device_id": "0", "enable_cuda_graph": "1"}
    assert list(cwd.iterdir()) == []
    open_bundle(tiny_bundle_copy)  # the cache folder does not make the bundle "damaged"

    other = tmp_path / "b2"
    import shutil

    shutil.copytree(tiny_bundle_copy, other)
    shutil.rmtree(other / ".ort-cache")
    (other / ".ort-cache").write_text("not a folder")  # e.g. a read-only bundle
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    got = ort_cache_dir(open_bundle(other), "tensorrt", "1.0")
    assert got.is_dir() and str(got).startswith(str(tmp_path / "xdg" / "eclipse-export" / "ort-cache"))


@functools.cache
def _cuda_reason() -> str | None:
    """None where ONNX Runtime's CUDA provider really runs here (needs onnxruntime-gpu and a GPU)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime-gpu is not installed"
    try:
        OnnxRuntimeBackend(["cuda"])  # preloads NVIDIA's pip CUDA libraries where they are
        s = ort.InferenceSession(_step_bytes(False), providers=["CUDAExecutionProvider"], enable_fallback=0)
    except Exception as e:
        return f"no CUDA session here: {ort_error_line(e)[:160]}"
    return None if s.get_providers()[0] == "CUDAExecutionProvider" else "ONNX Runtime fell back to the CPU"


@pytest.mark.parametrize("cfg", [True, False])
def test_step_graph_on_cuda_is_apply_step(cfg):
    """On the GPU: the step graph through IO binding on CUDA memory gives apply_step's numbers
    (float32 element-wise kernels; NaN must stay NaN, as np.clip keeps it)."""
    need("ort-cuda", _cuda_reason())
    import onnxruntime as ort

    from eclipse_export.runtime import guidance

    s = ort.InferenceSession(_step_bytes(cfg), providers=["CUDAExecutionProvider"], enable_fallback=0)
    rng = np.random.default_rng(1)
    shape = (2, 4, 32, 32)
    x = (3 * rng.standard_normal(shape)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    pred = rng.standard_normal(((4 if cfg else 2), *shape[1:])).astype(np.float32)
    noises = rng.standard_normal((2, *shape)).astype(np.float32)
    k = StepCoefficients(0.31, 0.95, 1.0, 0.52, 0.47, 0.0, 0.11)
    io = s.io_binding()
    for name, value in (("noise_pred", pred), ("latents", x), ("step_noise", noises), ("params", step_params(k, 4.0, 1))):
        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for name in ("latents_next", "sample_next"):
        io.bind_output(name, "cuda")
    s.run_with_iobinding(io)
    got = io.copy_outputs_to_cpu()[0]
    want = apply_step(k, guidance.combine(pred, 4.0) if cfg else pred, x, noises[1])
    assert np.isnan(got[0, 0, 0, 0])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [True, False])
def test_the_step_graph_on_cuda_copies_nothing_to_the_host(tmp_path, cfg):
    """Issue 18 #7, on the GPU: ONNX Runtime's profile of repeated steps (inputs and outputs bound
    on the device) holds no Memcpy node, so no step copies anything device -> host (a CUDA Clip
    with device-side bounds had ONNX Runtime insert a MemcpyToHost before it)."""
    need("ort-cuda", _cuda_reason())
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "step")
    s = ort.InferenceSession(_step_bytes(cfg), opts, providers=["CUDAExecutionProvider"], enable_fallback=0)
    shape = (1, 4, 64, 64)
    k = StepCoefficients(0.31, 0.95, 1.0, 0.52, 0.47, 0.0, 0.11)
    io = s.io_binding()
    pred = np.ones(((2 if cfg else 1), *shape[1:]), np.float32)
    for name, value in (("noise_pred", pred), ("latents", np.ones(shape, np.float32)),
                        ("step_noise", np.ones((2, *shape), np.float32)), ("params", step_params(k, 4.0, 1))):
        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for name in ("latents_next", "sample_next"):
        io.bind_output(name, "cuda")
    for _ in range(5):
        s.run_with_iobinding(io)
    events = json.loads(Path(s.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node"]
    ops = {e.get("args", {}).get("op_name") for e in nodes}
    assert nodes and "Where" in ops, sorted(filter(None, ops))  # the profile has the step's nodes
    copies = sorted({e["name"] for e in nodes if "memcpy" in e.get("args", {}).get("op_name", "").lower()})
    assert not copies, copies


@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_device_loop_matches_the_cuda_host_loop(tiny_bundle, graphs):
    """On the GPU: the device loop (CUDA graphs on or off) against the host loop on the same
    provider; the graph variant must really use the specialised session (no fallback note)."""
    need("ort-cuda", _cuda_reason())
    host = Pipeline.from_bundle(tiny_bundle, OnnxRuntimeBackend(["cuda"], device_loop=False))
    backend = OnnxRuntimeBackend(["cuda"], cuda_graphs=graphs)
    device = Pipeline.from_bundle(tiny_bundle, backend)
    for guidance in (4.0, 1.0):
        ref = _generate(host, guidance_scale=guidance)
        for _ in range(2):  # the second run replays the captured graph
            got = _generate(device, guidance_scale=guidance)
            np.testing.assert_allclose(got.intermediates["unet.latents"], ref.intermediates["unet.latents"],
                                       rtol=1e-4, atol=1e-4)
            assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1
    assert backend.notes == [] and backend.describe()["cuda_graphs"] is graphs
    if graphs:
        assert device.sessions["unet"].static_shapes is not None


def test_a_failing_graph_session_falls_back_with_a_note(tiny_bundle, tiny_pipeline, monkeypatch):
    """Graph capture happens inside a Run; where the specialised session fails, the loop runs again
    on the dynamic session, says so in describe(), and gives the host loop's result."""
    import onnxruntime as ort

    backend = OnnxRuntimeBackend(["cpu"], device_loop=True, cuda_graphs=True)
    pipe = Pipeline.from_bundle(tiny_bundle, backend)
    real = ort.InferenceSession.run_with_iobinding
    failed = []

    def capture_fails_once(self, *args, **kwargs):
        if not failed:  # the loop's first Run: the UNet's, on the specialised session
            failed.append(pipe.sessions["unet"].static_shapes)
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDA graph capture failed (test)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", capture_fails_once)
    got = _generate(pipe)
    assert failed[0] is not None and pipe.sessions["unet"].static_shapes is None
    assert backend.describe()["notes"] == ["UNet CUDA graph failed (CUDA graph capture failed (test)); "
                                           "running the dynamic session"]
    np.testing.assert_array_equal(got.images, _generate(tiny_pipeline).images)
