"""The TensorRT runtime backend.

No GPU here, so the backend's own code (binding, grow-only buffers, CUDA-graph capture and
replay, the device-resident UNet loop, low-memory release) runs against an emulated device:
device memory is a numpy heap, the "engine" is the bundle's ONNX on ONNX Runtime, the fused
guidance+step kernel is its numpy statement (schedulers.apply_step, held to diffusers in
test_schedulers). The real GPU path is tested at the end and skips without a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest

from eclipse_export.families.kandinsky22.components import COMPONENTS
from eclipse_export.runtime.backends import tensorrt as tb
from eclipse_export.runtime.backends.base import BackendError
from eclipse_export.runtime.backends.factory import make_backend
from eclipse_export.runtime.pipeline import Pipeline
from eclipse_export.runtime.schedulers import StepCoefficients, apply_step
from tests.gpu_required import cuda_reason, need


class FakeCuda:
    """Device memory as a numpy heap; a captured stream records closures a graph launch replays."""

    def __init__(self):
        self.heap: dict[int, np.ndarray] = {}
        self.next = 1 << 20
        self.stream = 7
        self.capturing: list | None = None
        self.live = 0
        self.graph_launches = 0
        self.kernel_launches = 0
        self.synchronizations = 0
        self.events: dict[int, int] = {}  # event -> kernel launches done when it was recorded
        self.waited: list[int] = []  # kernel launches done at each event wait
        self.poison_step: int | None = None  # the fused step yields NaN from this step on
        self.capture_error: str | None = None  # "begin" or "execute": capture fails there

    def malloc(self, n):
        ptr, self.next = self.next, self.next + ((n + 255) // 256 + 1) * 256
        self.heap[ptr] = np.zeros(n, np.uint8)
        self.live += 1
        return ptr

    def free(self, ptr):
        if ptr:
            del self.heap[ptr]
            self.live -= 1

    def view(self, ptr, nbytes):
        for base, block in self.heap.items():
            if base <= ptr and ptr + nbytes <= base + block.size:
                return block[ptr - base: ptr - base + nbytes]
        raise AssertionError(f"access outside any allocation: {ptr:#x}+{nbytes}")

    def _do(self, fn):
        if self.capturing is not None:
            self.capturing.append(fn)
        else:
            fn()

    def h2d(self, dst, src):
        src = np.ascontiguousarray(src)
        self.view(dst, src.nbytes)[:] = src.view(np.uint8).reshape(-1)

    def d2h(self, dst, src):
        def copy():
            dst.reshape(-1).view(np.uint8)[:] = self.view(src, dst.nbytes)
        self._do(copy)

    def d2d(self, dst, src, n):
        self._do(lambda: self.view(dst, n).__setitem__(slice(None), self.view(src, n)))

    def synchronize(self):
        self.synchronizations += 1

    def event(self):
        ev = len(self.events) + 100
        self.events[ev] = 0
        return ev

    def record(self, ev):
        self._do(lambda: self.events.__setitem__(ev, self.kernel_launches))

    def wait_event(self, ev):
        self.waited.append(self.events[ev])

    def destroy_event(self, ev):
        del self.events[ev]

    def begin_capture(self):
        if self.capture_error == "begin":
            raise tb.CudaError("CUDA cudaStreamBeginCapture failed: cudaErrorStreamCaptureUnsupported")
        self.capturing = []

    def end_capture(self):
        graph, self.capturing = self.capturing, None
        return graph

    def launch_graph(self, graph):
        self.graph_launches += 1
        for fn in graph:
            fn()

    def destroy_graph(self, graph):
        pass

    def mem_info(self):
        return (0, 0)

    def close(self):
        pass

    def guided_step(self, pred, latents, noise, sample_out, n, cfg, scale, coefficients, bad_step=0, step=0):
        def run():
            self.kernel_launches += 1
            p = self.view(pred, (2 if cfg else 1) * n * 4).view(np.float32)
            eps = p[:n] + np.float32(scale) * (p[n:] - p[:n]) if cfg else p[:n].copy()
            if self.poison_step is not None and step >= self.poison_step:
                eps[0] = np.nan
            x = self.view(latents, n * 4).view(np.float32)
            nz = self.view(noise, n * 4).view(np.float32) if noise else None
            prev = apply_step(StepCoefficients(*coefficients), eps, x, nz)
            flag = self.view(bad_step, 4).view(np.uint32)
            if bad_step and not np.isfinite(prev).all() and flag[0] == 0:  # the kernel's atomicCAS
                flag[0] = step + 1
            x[:] = prev
            if sample_out:
                out = self.view(sample_out, (2 if cfg else 1) * n * 4).view(np.float32)
                out[:n] = prev
                if cfg:
                    out[n:] = prev
        self._do(run)


def _np_type(ort_type: str) -> np.dtype:
    return np.dtype({"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
                     "tensor(int64)": "int64"}[ort_type])


class FakeContext:
    def __init__(self, cuda: FakeCuda, session, names):
        self.cuda, self.session, self.names = cuda, session, names
        self.shapes, self.addresses = {}, {}
        self.executions = 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        feed = {i.name: np.zeros(self.shapes[i.name], _np_type(i.type)) for i in self.session.get_inputs()}
        return self.session.run([name], feed)[0].shape

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        if self.cuda.capturing is not None and self.cuda.capture_error == "execute":
            return False

        def run():
            self.executions += 1
            feed = {}
            for i in self.session.get_inputs():
                dtype = _np_type(i.type)
                n = int(np.prod(self.shapes[i.name])) * np.dtype(dtype).itemsize
                feed[i.name] = self.cuda.view(self.addresses[i.name], n).view(dtype).reshape(self.shapes[i.name])
            outs = self.session.run(None, feed)
            for o, value in zip(self.session.get_outputs(), outs):
                self.cuda.view(self.addresses[o.name], value.nbytes)[:] = value.view(np.uint8).reshape(-1)
        assert stream == self.cuda.stream
        self.cuda._do(run)
        return True


def _unet_engine(backend) -> "FakeEngine":
    # by file name: the pipeline loads the largest graphs first, not in the chain's order
    (engine,) = [e for e in backend.engines if e.path.stem.startswith("unet")]
    return engine


class FakeEngine:
    def __init__(self, cuda, path):
        import onnxruntime as ort

        self.cuda = cuda
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.io = [(i.name, i.type, True) for i in self.session.get_inputs()]
        self.io += [(o.name, o.type, False) for o in self.session.get_outputs()]
        self.num_io_tensors = len(self.io)
        self.contexts = []

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_dtype(self, name):
        return next(_np_type(t) for n, t, _ in self.io if n == name)

    def get_tensor_mode(self, name):
        return next("in" if is_in else "out" for n, _, is_in in self.io if n == name)

    def create_execution_context(self):
        ctx = FakeContext(self.cuda, self.session, [n for n, _, _ in self.io])
        self.contexts.append(ctx)
        return ctx


def fake_backend(bundle, low_memory=False, cuda_graphs=True) -> tb.TensorRTBackend:
    backend = tb.TensorRTBackend.__new__(tb.TensorRTBackend)
    backend.flavour, backend.low_memory, backend.cuda_graphs = "tensorrt", low_memory, cuda_graphs
    backend.runtime_cache_dir = None
    backend.cuda = FakeCuda()
    backend.engines = []

    def deserialize(data):
        engine = FakeEngine(backend.cuda, bundle / data.decode())
        backend.engines.append(engine)
        return engine

    backend.trt = types.SimpleNamespace(nptype=np.dtype, TensorIOMode=types.SimpleNamespace(INPUT="in"))
    backend.runtime = types.SimpleNamespace(deserialize_cuda_engine=deserialize)
    backend.name = "tensorrt"
    backend._loop_buffers = {}
    backend.sessions, backend.warnings = [], []

    def load(spec, b):
        # the "engine file" names the ONNX graph the fake engine runs
        engine_file = b.root / f"{spec.name}.fake-engine"
        engine_file.write_bytes(b.component(spec.name)["graph"].encode())
        entry = {"file": engine_file.name, "key": spec.name, "profile": {}, "strip_weights": False}
        b = dataclasses.replace(b, files=b.files | {engine_file.name})  # as a real bundle lists its engines
        session = tb.TrtSession(backend, spec, b, entry)
        backend.sessions.append(session)
        return session

    backend.load = load
    return backend


@pytest.fixture()
def bundle_dir(tiny_bundle_copy):
    return tiny_bundle_copy


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_device_loop_matches_the_host_loop(bundle_dir, kind, guidance):
    """Same bundle, same noises: the backend's device-resident loop (graph capture, fused step
    kernel, buffers reused across steps) gives the host loop's image."""
    host = Pipeline.from_bundle(bundle_dir)
    backend = fake_backend(bundle_dir)
    device = Pipeline.from_bundle(bundle_dir, backend)
    args = dict(prompt=["a red cube", "two blue spheres"], height=128, width=192, steps=5,
                guidance_scale=guidance, seed=3, scheduler=kind, record=True)
    ref = host.generate(**args)
    got = device.generate(**args)
    steps = 5
    cuda = backend.cuda
    unet_ctx = _unet_engine(backend).contexts[0]
    # captured once after one plain enqueue, replayed for the other steps
    assert unet_ctx.executions == steps and cuda.graph_launches == steps - 1
    assert cuda.kernel_launches == steps
    for key in ("unet.noise_pred_step0", "unet.latents"):
        np.testing.assert_allclose(got.intermediates[key], ref.intermediates[key], rtol=1e-5, atol=1e-5)
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1


def test_low_memory_holds_one_engine_at_a_time(bundle_dir):
    backend = fake_backend(bundle_dir, low_memory=True)
    pipe = Pipeline.from_bundle(bundle_dir, backend)
    assert backend.engines == []  # nothing deserialized until a stage runs
    ref = Pipeline.from_bundle(bundle_dir).generate("a cat", height=64, width=64, steps=3, seed=1)
    gen = pipe.generate("a cat", height=64, width=64, steps=3, seed=1)
    assert [len(e.contexts) for e in backend.engines] == [1, 1, 1, 1]
    assert all(s.engine is None and not s.buffers for s in pipe.sessions.values())
    # only the loop's own buffers (latents, timesteps, step noise) stay allocated
    assert backend.cuda.live == len(backend._loop_buffers)
    assert np.abs(gen.images.astype(int) - ref.images.astype(int)).max() <= 1
    pipe.generate("a cat", height=64, width=64, steps=3, seed=1)  # reloads cleanly
    assert len(backend.engines) == 8


def test_buffers_are_reused_until_a_shape_grows(bundle_dir):
    backend = fake_backend(bundle_dir)
    pipe = Pipeline.from_bundle(bundle_dir, backend)
    pipe.generate("a", height=128, width=128, steps=2)
    unet = pipe.sessions["unet"]
    before = {n: b.ptr for n, b in unet.buffers.items()}
    pipe.generate("b", height=64, width=64, steps=2)  # smaller: same addresses
    assert {n: b.ptr for n, b in unet.buffers.items()} == before
    pipe.generate("c", height=192, width=128, steps=2)  # larger: reallocated
    assert unet.buffers["sample"].ptr != before["sample"]


def _generate(bundle_dir, backend=None, **kw):
    args = dict(prompt="a red cube", height=64, width=64, steps=4, seed=2, guidance_scale=4.0)
    args.update(kw)
    return Pipeline.from_bundle(bundle_dir, backend).generate(**args)


@pytest.mark.parametrize("where", ["begin", "execute"])
def test_a_failed_cuda_graph_capture_falls_back_to_plain_enqueues(bundle_dir, where):
    """Issue 11 #8: the generation goes on without CUDA graphs, with a warning, same image."""
    backend = fake_backend(bundle_dir)
    backend.cuda.capture_error = where
    got = _generate(bundle_dir, backend)
    ref = _generate(bundle_dir)
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1
    assert backend.cuda.graph_launches == 0 and backend.cuda.capturing is None
    assert [w for w in got.warnings if "CUDA-graph capture failed" in w and "without CUDA graphs" in w]
    assert _unet_engine(backend).contexts[0].executions == 4  # every step ran as a plain enqueue


def test_nan_latents_are_an_error_naming_the_first_bad_step(bundle_dir):
    """Issue 11 #9: the kernel's flag (emulated here; the kernel itself is compiled in
    test_cuda_api) is read once after the loop and names the step where NaN appeared."""
    backend = fake_backend(bundle_dir)
    backend.cuda.poison_step = 2  # 0-based: the third step
    with pytest.raises(BackendError, match="NaN/Inf latents at step 3 of 4"):
        _generate(bundle_dir, backend)


def test_progress_reports_work_done_without_draining_the_stream_each_step(bundle_dir):
    """Issue 11 #9: no stream synchronisation per step; progress(i) comes once step i's kernel
    has run (an event), with one step always queued ahead."""
    steps = 6
    plain = fake_backend(bundle_dir)
    _generate(bundle_dir, plain, steps=steps)
    backend = fake_backend(bundle_dir)
    seen = []
    Pipeline.from_bundle(bundle_dir, backend).generate("a red cube", height=64, width=64, steps=steps, seed=2,
                                                       progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, steps) for i in range(1, steps + 1)]
    assert backend.cuda.synchronizations == plain.cuda.synchronizations  # progress adds no synchronisation
    assert backend.cuda.waited == list(range(1, steps))  # progress(i) after waiting for kernel i
    assert backend.cuda.events == {}  # destroyed


@pytest.mark.parametrize("low_memory", [False, True])
def test_the_runtime_cache_is_saved_on_close_in_every_mode(bundle_dir, tmp_path, low_memory):
    """Issue 11 #5: TensorRT-RTX's runtime cache (the kernels it compiled for this GPU) was
    written only by low-memory mode's per-stage release."""
    class Cache:
        def serialize(self):
            return b"jit kernels"

    backend = fake_backend(bundle_dir, low_memory=low_memory)
    backend.runtime_cache_dir = tmp_path / "rtcache"
    pipe = Pipeline.from_bundle(bundle_dir, backend)
    for session in pipe.sessions.values():
        session.runtime_cache = Cache()
    if not low_memory:
        pipe.generate("a cat", height=64, width=64, steps=2)
    pipe.close()
    saved = sorted(p.name for p in (tmp_path / "rtcache").iterdir())
    assert saved == sorted(f"{name}.rtcache" for name in COMPONENTS)
    assert (tmp_path / "rtcache" / "unet.rtcache").read_bytes() == b"jit kernels"
    assert all(s.engine is None and not s.buffers for s in pipe.sessions.values())


def test_no_gpu_gives_a_clear_error():
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt-rtx is not installed")
    try:
        from cuda.bindings import runtime
    except ImportError:
        pytest.skip("cuda-python is not installed")
    err, count = runtime.cudaGetDeviceCount()
    if int(err) == 0 and count > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match="no usable CUDA GPU"):
        make_backend("tensorrt-rtx")


def test_every_engine_is_checked_before_any_is_loaded(bundle_dir):
    """One error naming every engine that cannot run here, raised before deserializing any."""
    from eclipse_export.runtime.bundle import open_bundle

    backend = fake_backend(bundle_dir)
    backend.flavour = "tensorrt-rtx"
    backend.trt = types.SimpleNamespace(__version__="1.7.1.116")
    backend.device = types.SimpleNamespace(compute_capability="SM86")
    bundle = open_bundle(bundle_dir)
    engines = {name: {"flavour": "tensorrt-rtx", "version": "1.7.1.116", "compute_capabilities": ["SM89"],
                      "file": "x"} for name in COMPONENTS}
    engines["prior"]["version"] = "1.6.0"
    bundle = dataclasses.replace(bundle, manifest=dict(bundle.manifest, engines=engines))
    with pytest.raises(BackendError) as e:
        Pipeline(bundle, backend)
    msg = str(e.value)
    assert all(f"{name}: built for SM89, this GPU is SM86" in msg for name in COMPONENTS)
    assert "prior: built with tensorrt-rtx 1.6.0" in msg and "--target trt-rtx-fp16" in msg
    assert backend.engines == []


def test_engine_refusal_names_the_rebuild_command(bundle_dir):
    from eclipse_export.runtime.bundle import open_bundle

    backend = tb.TensorRTBackend.__new__(tb.TensorRTBackend)
    backend.flavour = "tensorrt-rtx"
    backend.trt = types.SimpleNamespace(__version__="1.9.0")
    backend.device = types.SimpleNamespace(compute_capability="SM86")
    bundle = open_bundle(bundle_dir)
    with pytest.raises(BackendError, match="has no engine for prior"):
        backend.load(COMPONENTS["prior"], bundle)
    manifest = dict(bundle.manifest, engines={"prior": {"flavour": "tensorrt-rtx", "version": "1.7.1.116",
                                                        "compute_capabilities": ["SM89"], "file": "x"}})
    bundle = dataclasses.replace(bundle, manifest=manifest)
    with pytest.raises(BackendError) as e:
        backend.load(COMPONENTS["prior"], bundle)
    msg = str(e.value)
    assert "built with tensorrt-rtx 1.7.1.116, this machine has 1.9.0" in msg
    assert "built for SM89, this GPU is SM86" in msg and "--target trt-rtx-fp16" in msg


def _gpu_reason(probe=None) -> str | None:
    """Why the real-GPU test cannot run here (None: it can): the backend's own start-up checks,
    so a GPU the installed flavour cannot target (TensorRT-RTX 1.7 on an H100: no SM90) skips."""
    from eclipse_export.runtime.backends.gpu_probe import cuda_probe, readiness

    flavour = _gpu_flavour()
    if flavour is None:
        return "neither tensorrt nor tensorrt-rtx is installed"
    failed = [c.line() for c in readiness(flavour, probe=probe or cuda_probe()) if not c.ok]
    return "; ".join(failed) or None


def _gpu_flavour() -> str | None:
    if importlib.util.find_spec("tensorrt_rtx"):
        return "tensorrt-rtx"
    return "tensorrt" if importlib.util.find_spec("tensorrt") else None


def test_the_gpu_test_skips_where_the_flavour_cannot_target_the_gpu():
    """Issue 11 #7: an H100 (SM90) with TensorRT-RTX 1.7 installed is a skip with the reason."""
    from eclipse_export.runtime.backends.gpu_probe import Check, CudaProbe, Gpu

    if _gpu_flavour() != "tensorrt-rtx":
        pytest.skip("tensorrt-rtx is not installed")
    ready = (Check("cuda-bindings", True, "cuda-bindings 13.5.0"), Check("nvrtc", True, "NVRTC 13.5"),
             Check("gpu", True, "NVIDIA H100 80GB HBM3 (SM90)"))
    h100 = CudaProbe((13, 0), "13.5.0", (13, 5), (75, 90), (Gpu(0, "NVIDIA H100 80GB HBM3", "SM90", 80 << 30),), ready)
    reason = _gpu_reason(h100)
    assert reason and "cannot target NVIDIA H100 80GB HBM3 (SM90" in reason
    rtx4090 = CudaProbe((13, 0), "13.5.0", (13, 5), (75, 89), (Gpu(0, "RTX 4090", "SM89", 24 << 30),), ready)
    assert _gpu_reason(rtx4090) is None


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_real_engines_on_the_gpu_match_onnx_runtime(tmp_path):
    """On a GPU: build the tiny bundle's engines here, run the chain on them (device loop, CUDA
    graphs) and check it against the same FP16 graphs on ONNX Runtime."""
    from eclipse_export.export.engines import BuildOptions
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.sources import RandomSource
    from eclipse_export.metrics.parity import compare
    from eclipse_export.runtime.backends.tensorrt import TensorRTBackend

    flavour = _gpu_flavour()
    backend = TensorRTBackend(flavour)
    target = "trt-rtx-fp16" if flavour == "tensorrt-rtx" else "trt-fp16"
    build = BuildOptions(workspace_mib=8192, max_batch=1,
                         compute_capabilities=(backend.device.compute_capability,))
    out = export_bundle(RandomSource("tiny"), tmp_path / "b", ExportOptions(target=target, build=build),
                        log=lambda m: None)
    args = dict(prompt="a red cube", height=128, width=128, steps=4, seed=0, record=True)
    ref = Pipeline.from_bundle(out).generate(**args)
    got = Pipeline.from_bundle(out, backend).generate(**args)
    for key in ("text_encoder.text_embeds", "prior.image_embeds", "unet.noise_pred_step0", "unet.latents"):
        stage = compare(key, got.intermediates[key], ref.intermediates[key], COMPONENTS["unet"].tolerance("fp16"))
        assert stage.ok, stage


def test_the_device_loop_checks_the_dtype_of_every_unet_input_and_output(bundle_dir):
    """Issue 18 #9: the loop writes float32 bytes into every UNet tensor (timestep and embeddings
    too), so an engine with any other I/O type is refused before anything is bound."""
    backend = fake_backend(bundle_dir)
    pipe = Pipeline.from_bundle(bundle_dir, backend)
    unet = pipe.sessions["unet"]
    unet.load()
    unet.dtypes["timestep"] = np.dtype(np.int64)
    with pytest.raises(BackendError, match=r"float32 UNet I/O, the engine has \{'timestep': 'int64'\}"):
        pipe.generate("a cat", height=64, width=64, steps=2, seed=1)
    assert not unet.buffers  # refused before any buffer


class FakeRtxCache:
    def __init__(self, refuse: bool):
        self.refuse, self.data = refuse, None

    def deserialize(self, data):
        self.data = data
        return not self.refuse

    def serialize(self):
        return b"jit kernels"


class FakeRtxConfig:
    def __init__(self, refuse_file: bool, refuse_set: bool):
        self.refuse_file, self.refuse_set, self.cache, self.made = refuse_file, refuse_set, None, 0

    def create_runtime_cache(self):
        self.made += 1
        return FakeRtxCache(self.refuse_file and self.made == 1)

    def set_runtime_cache(self, cache):
        self.cache = cache
        return not self.refuse_set


@pytest.mark.parametrize("refuse", ["nothing", "file", "set"])
def test_tensorrt_rtx_runtime_config_lives_with_its_context_and_cache_results_are_checked(bundle_dir, tmp_path,
                                                                                        monkeypatch, refuse):
    """Issue 18 #8: the IRuntimeConfig was a local dropped after the context was made (the
    context refers to it); deserialize / set_runtime_cache results were ignored."""
    import gc
    import weakref

    from eclipse_export.runtime.bundle import open_bundle

    configs = []

    def create_runtime_config(self):
        configs.append(FakeRtxConfig(refuse == "file", refuse == "set"))
        return configs[-1]

    monkeypatch.setattr(FakeEngine, "create_runtime_config", create_runtime_config, raising=False)
    monkeypatch.setattr(FakeEngine, "create_execution_context",
                        lambda self, config=None: FakeContext(self.cuda, self.session, [n for n, _, _ in self.io]))
    backend = fake_backend(bundle_dir)
    backend.flavour = "tensorrt-rtx"
    backend.runtime_cache_dir = tmp_path / "rtcache"
    backend.runtime_cache_dir.mkdir()
    (backend.runtime_cache_dir / "unet.rtcache").write_bytes(b"from another version")
    session = backend.load(COMPONENTS["unet"], open_bundle(bundle_dir))
    alive = weakref.ref(configs[0])
    configs.clear()
    gc.collect()
    assert alive() is not None and session.runtime_config is alive()
    warnings = backend.drain_warnings()
    if refuse == "nothing":
        assert warnings == [] and session.runtime_cache.data == b"from another version"
        assert alive().cache is session.runtime_cache
    elif refuse == "file":
        assert "refused the runtime cache" in warnings[0]
        assert session.runtime_cache.data is None and alive().cache is session.runtime_cache  # a fresh one
    else:
        assert "runtime cache not usable" in warnings[0] and session.runtime_cache is None
    session.release()
    gc.collect()
    assert alive() is None and session.context is None and session.engine is None


# --- on a GPU without TensorRT (issue 18, 2b): the backend's loop with a stand-in engine -----------

KERNEL_UNET = r"""
extern "C" __global__ void kernel_unet(const float* sample, const float* t, const float* embeds, float* out,
                                       long long rows, long long per_row, long long d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * per_row) return;
    long long r = i / per_row, k = i % per_row;
    out[i] = 0.1f * sample[i] + 1e-4f * t[0] + 0.05f * embeds[r * d + k % d];
}
"""
UNET_IO = (("sample", True), ("timestep", True), ("image_embeds", True), ("noise_pred", False))


def _host_unet(sample, t, embeds):
    """The stand-in UNet's function in numpy: noise_pred[r, i] = 0.1 s + 1e-4 t + 0.05 e[r, i % D]."""
    per_row, d = sample[0].size, embeds.shape[1]
    e = embeds[:, np.arange(per_row) % d].reshape(sample.shape)
    return np.float32(0.1) * sample + np.float32(1e-4) * np.float32(t) + np.float32(0.05) * e


class KernelContext:
    """An execution context whose enqueue does real CUDA work: one NVRTC kernel on the stream."""

    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.executions = engine, {}, {}, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["sample"] if name == "noise_pred" else self.shapes[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        import ctypes

        cuda = self.engine.cuda
        s, d = self.shapes["sample"], self.shapes["image_embeds"][1]
        rows, per_row = s[0], int(np.prod(s[1:]))
        p, ll = ctypes.c_void_p, ctypes.c_longlong
        a = self.addresses
        args = ((a["sample"], a["timestep"], a["image_embeds"], a["noise_pred"], rows, per_row, d),
                (p, p, p, p, ll, ll, ll))
        blocks = (rows * per_row + 255) // 256
        err, = cuda.driver.cuLaunchKernel(self.engine.function, blocks, 1, 1, 256, 1, 1, 0, stream, args, 0)
        self.executions += 1
        return int(err) == 0


class KernelEngine:
    def __init__(self, cuda):
        from eclipse_export.runtime.backends.cuda import _ok, compile_kernel

        self.cuda = cuda
        _, image = compile_kernel(cuda.nvrtc, KERNEL_UNET, "kernel_unet", cuda.info().sm)
        self.module = _ok(cuda.driver.cuModuleLoadData(image), "cuModuleLoadData(kernel_unet)")
        self.function = cuda._function(self.module, "kernel_unet")
        self.num_io_tensors = len(UNET_IO)
        self.contexts = []

    def get_tensor_name(self, i):
        return UNET_IO[i][0]

    def get_tensor_dtype(self, name):
        return np.float32

    def get_tensor_mode(self, name):
        return "in" if dict(UNET_IO)[name] else "out"

    def create_execution_context(self):
        self.contexts.append(KernelContext(self))
        return self.contexts[-1]


def kernel_backend(tmp_path, low_memory=False):
    """The real TensorRTBackend on the real device (Cuda), TensorRT's runtime replaced by
    KernelEngine: what runs is the backend's own binding, buffers, capture and loop."""
    from eclipse_export.runtime.backends.cuda import Cuda

    backend = tb.TensorRTBackend.__new__(tb.TensorRTBackend)
    backend.flavour, backend.low_memory, backend.cuda_graphs = "tensorrt", low_memory, True
    backend.runtime_cache_dir = None
    backend.cuda = Cuda(0)
    backend.device = backend.cuda.info()
    backend.engines = []
    backend.trt = types.SimpleNamespace(nptype=np.dtype, TensorIOMode=types.SimpleNamespace(INPUT="in"))

    def deserialize(data):
        backend.engines.append(KernelEngine(backend.cuda))
        return backend.engines[-1]

    backend.runtime = types.SimpleNamespace(deserialize_cuda_engine=deserialize)
    backend.name, backend._loop_buffers, backend.sessions, backend.warnings = "tensorrt", {}, [], []
    graph_launches = []
    real_launch = backend.cuda.launch_graph
    backend.cuda.launch_graph = lambda g: graph_launches.append(g) or real_launch(g)
    (tmp_path / "unet.plan").write_bytes(b"stand-in")
    bundle = types.SimpleNamespace(root=tmp_path, path=lambda name: tmp_path / name)
    spec = types.SimpleNamespace(name="unet", input_names=["sample", "timestep", "image_embeds"],
                                 output_names=["noise_pred"])
    bundle.path = lambda name: tmp_path / name
    session = tb.TrtSession(backend, spec, bundle, {"file": "unet.plan", "key": "unet", "profile": {}})
    backend.sessions.append(session)
    return backend, session, graph_launches


DDPM = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "linear", "clip_sample": True, "prediction_type": "epsilon", "steps_offset": 1,
        "timestep_spacing": "leading", "variance_type": "fixed_small", "set_alpha_to_one": False}


def _loop_case(shape, steps, cfg, seed=0):
    from eclipse_export.runtime.schedulers import scheduler_from_config

    rng = np.random.default_rng(seed)
    sched = scheduler_from_config(DDPM)
    sched.set_timesteps(steps)
    latents = rng.standard_normal(shape, dtype=np.float32)
    embeds = rng.standard_normal(((2 if cfg else 1) * shape[0], 8), dtype=np.float32)
    noise = rng.standard_normal((steps, *shape), dtype=np.float32)
    return sched, latents, embeds, noise


def _host_loop(sched, latents, embeds, noise, scale):
    from eclipse_export.runtime import guidance

    x = latents.copy()
    for i, t in enumerate(sched.timesteps):
        sample = np.concatenate([x, x]) if scale is not None else x
        pred = _host_unet(sample, t, embeds)
        eps = guidance.combine(pred, scale) if scale is not None else pred
        k = sched.step_coefficients(int(t))
        x = apply_step(k, eps, x, noise[i] if k.std else None)
    return x


def test_the_device_loop_on_a_gpu_with_a_kernel_engine_matches_the_host_loop(tmp_path):
    """Issue 18 2b, on the real device: bindings and their addresses, the backend's stream,
    grow-only buffers, the UNet enqueue captured once and replayed, re-capture after a shape
    change, against the numpy host loop of the same function."""
    need("cuda", cuda_reason())
    backend, unet, launches = kernel_backend(tmp_path)
    try:
        sched, latents, embeds, noise = _loop_case((1, 4, 32, 32), 6, True)
        want = _host_loop(sched, latents, embeds, noise, 4.0)
        got = backend.denoise(unet, latents, embeds, sched, 4.0, noise)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        ctx = backend.engines[0].contexts[0]
        assert ctx.executions == 2 and len(launches) == 5  # plain + capture, then 5 replays
        graph, ptrs = unet.graph, {n: b.ptr for n, b in unet.buffers.items()}
        got = backend.denoise(unet, latents, embeds, sched, 4.0, noise)  # replayed from step 0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert unet.graph is graph and len(launches) == 11 and {n: b.ptr for n, b in unet.buffers.items()} == ptrs
        # no CFG: fewer rows, the same buffers, a new capture
        sched2, lat2, emb2, noise2 = _loop_case((1, 4, 32, 32), 4, False, seed=1)
        got = backend.denoise(unet, lat2, emb2, sched2, None, noise2)
        np.testing.assert_allclose(got, _host_loop(sched2, lat2, emb2, noise2, None), rtol=1e-5, atol=1e-6)
        assert unet.graph is not graph and {n: b.ptr for n, b in unet.buffers.items()} == ptrs
        # larger latents: grown buffers, captured again
        sched3, lat3, emb3, noise3 = _loop_case((1, 4, 64, 48), 3, True, seed=2)
        got = backend.denoise(unet, lat3, emb3, sched3, 7.5, noise3)
        np.testing.assert_allclose(got, _host_loop(sched3, lat3, emb3, noise3, 7.5), rtol=1e-5, atol=1e-6)
        assert unet.buffers["sample"].ptr != ptrs["sample"] and backend.drain_warnings() == []
    finally:
        backend.close()


def test_low_memory_on_a_gpu_frees_the_engines_device_memory(tmp_path):
    """Issue 18 2b: low-memory mode's stage_done frees the engine's buffers on the device (the
    free device memory comes back), and the next generation loads again and matches."""
    need("cuda", cuda_reason())
    backend, unet, _ = kernel_backend(tmp_path, low_memory=True)
    try:
        # 64 MiB of engine buffers (sample and noise_pred under CFG), 64 MiB of the loop's own
        sched, latents, embeds, noise = _loop_case((1, 4, 1024, 1024), 3, True)
        want = _host_loop(sched, latents, embeds, noise, 4.0)
        backend.cuda.synchronize()
        free_before, _ = backend.cuda.mem_info()
        for _ in range(2):
            got = backend.denoise(unet, latents, embeds, sched, 4.0, noise)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            loop_bytes = sum(b.capacity for b in backend._loop_buffers.values())
            backend.stage_done(unet)
            assert unet.engine is None and unet.buffers == {} and unet.graph is None
            free_after, _ = backend.cuda.mem_info()
            # what stays is the loop's own buffers (latents, timesteps, noise), to the driver's granularity
            assert free_before - free_after <= loop_bytes + (16 << 20), (free_before, free_after, loop_bytes)
        assert len(backend.engines) == 2  # loaded once per generation
    finally:
        backend.close()
