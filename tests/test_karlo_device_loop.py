"""Karlo's device loops on ONNX Runtime (issue 20 item 4): the unCLIP step graphs
(export/step_graph.py unclip_step_model) and the loop with IO binding
(runtime/backends/ort_unclip_loop.py), held to the host loop on the CPU provider with the rule
of the Kandinsky loop's test (tests/test_ort_device_loop.py): equal, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from eclipse_export.families.karlo.presets import DECODER_SCHEDULER_KARLO as DECODER_SCHEDULER
from eclipse_export.families.karlo.presets import SUPER_RES_SCHEDULER_KARLO as SUPER_RES_SCHEDULER
from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend
from eclipse_export.runtime.backends.ort_unclip_loop import UNCLIP_FILES, UNCLIP_KINDS, unclip_params
from tests.test_unclip_device_step import CASES, _case, build_host_kernels, chain_step


@pytest.mark.parametrize("kind", list(UNCLIP_KINDS))
def test_the_unclip_step_graph_is_the_numpy_step_bit_for_bit(kind):
    """Every step of a 5-step schedule (the last adds no noise), NaN carried, on the CPU provider."""
    import onnxruntime as ort

    from eclipse_export.export.step_graph import unclip_step_model

    cfg, learned = UNCLIP_KINDS[kind]
    session = ort.InferenceSession(unclip_step_model(cfg, learned).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for case in [c for c in CASES if (CASES[c][1] == 2) == learned]:
        config, per = CASES[case]
        rng = np.random.default_rng(4)
        sched, pred, x, noise = _case(rng, config, per, cfg, shape=(2, 3, 16, 16))
        x[0, 0, 0, 0] = np.nan
        noises = np.stack([rng.standard_normal(x.shape).astype(np.float32), noise])
        scale = 8.0 if cfg else None
        for i, t in enumerate(sched.timesteps):
            k = sched.step_terms(int(t), sched.prev_timestep(i))
            feed = {"noise_pred": pred, "latents": x, "step_noise": noises, "params": unclip_params(k, scale, 1)}
            if learned:
                feed["log_params"] = np.array([k.min_log, k.max_log], np.float64)
            latents_next, sample_next = session.run(None, feed)
            want = chain_step(sched, pred, x, i, noise, scale)
            np.testing.assert_array_equal(latents_next, want, err_msg=f"{case} step {i}")
            np.testing.assert_array_equal(sample_next, np.concatenate([want] * (2 if cfg else 1)))
            assert np.isnan(latents_next[0, 0, 0, 0])


@pytest.fixture(scope="module")
def karlo_bundle(tmp_path_factory):
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.source_factory import make_source

    out = tmp_path_factory.mktemp("karlo-loop") / "tiny-karlo-onnx"
    export_bundle(make_source("tiny-karlo"), out, ExportOptions(), log=lambda m: None)
    return out


@pytest.mark.slow
def test_karlo_bundles_carry_the_unclip_step_graphs(karlo_bundle):
    from eclipse_export.runtime.bundle import open_bundle

    bundle = open_bundle(karlo_bundle)
    assert bundle.manifest["step_graphs"] == UNCLIP_FILES
    for kind in UNCLIP_KINDS:
        assert bundle.step_graph_path(kind).is_file()


def _generate(pipe, **kw):
    args = {"prompt": ["a red frog", "two dogs in the snow"], "height": 64, "width": 64, "steps": 4, "seed": 3,
            "record": True}
    return pipe.generate(**{**args, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [8.0, 1.0], ids=["cfg", "no-cfg"])
def test_the_device_loops_equal_the_host_loops(karlo_bundle, guidance):
    """Same graphs, same noises: the decoder and super-resolution loops with IO binding and the
    step graphs give the host loops' results exactly, twice in a row; progress counts every step
    of both loops once."""
    from eclipse_export.runtime.pipeline import Pipeline

    host = Pipeline.from_bundle(karlo_bundle)
    backend = OnnxRuntimeBackend(["cpu"], device_loop=True, cuda_graphs=False)
    device = Pipeline.from_bundle(karlo_bundle, backend)
    calls = []
    backend_calls = []
    real = backend.denoise_unclip
    backend.denoise_unclip = lambda *a, **k: backend_calls.append(len(a[0])) or real(*a, **k)
    ref = _generate(host, guidance_scale=guidance)
    for _ in range(2):
        got = _generate(device, guidance_scale=guidance, progress=lambda d, n: calls.append((d, n)))
        for key in ("decoder.noise_pred_step0", "decoder.image_small", "super_res_first.noise_pred_step0",
                    "super_res.image"):
            np.testing.assert_array_equal(got.intermediates[key], ref.intermediates[key], err_msg=key)
        np.testing.assert_array_equal(got.images, ref.images)
    assert backend_calls == [1, 2, 1, 2]  # the decoder, then both super-resolution UNets, on the device
    total = 4 + 7
    assert calls[:total] == [(i, total) for i in range(1, total + 1)]


@pytest.mark.slow
def test_a_karlo_bundle_without_unclip_step_graphs_loops_on_the_host_with_a_note(karlo_bundle, tmp_path):
    import json
    import shutil

    from eclipse_export.runtime.pipeline import Pipeline

    old = tmp_path / "old"
    shutil.copytree(karlo_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for rel in manifest.pop("step_graphs").values():
        manifest["files"].pop(rel)
    (old / "manifest.json").write_text(json.dumps(manifest))
    backend = OnnxRuntimeBackend(["cpu"], device_loop=True, cuda_graphs=False)
    pipe = Pipeline.from_bundle(old, backend)
    got = _generate(pipe, guidance_scale=8.0)
    np.testing.assert_array_equal(got.images, _generate(Pipeline.from_bundle(karlo_bundle), guidance_scale=8.0).images)
    assert any("no unCLIP step graph" in n for n in backend.describe().get("notes", []))
    # the note's command adds them: --from-bundle writes the family's missing step graphs
    from eclipse_export.export.derive import build_engines_for_bundle
    from eclipse_export.runtime.bundle import open_bundle

    new = build_engines_for_bundle(old, tmp_path / "new", "onnx", None, log=lambda m: None)
    assert open_bundle(new).manifest["step_graphs"] == UNCLIP_FILES
    backend = OnnxRuntimeBackend(["cpu"], device_loop=True, cuda_graphs=False)
    np.testing.assert_array_equal(_generate(Pipeline.from_bundle(new, backend), guidance_scale=8.0).images, got.images)
    assert not backend.notes


# --- the TensorRT backends' loop (runtime/backends/trt_unclip_loop.py) on the emulated device ------
# tests/test_tensorrt_backend.py's emulation (device memory a numpy heap, engines the bundle's
# ONNX on ONNX Runtime); the unclip_step kernel is the kernel's own source built for the host
# (tests/test_unclip_device_step.py), run on that heap.


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    return build_host_kernels(tmp_path_factory)


@pytest.fixture()
def trt_karlo(karlo_bundle, tmp_path, host_kernels):
    import shutil

    from tests.test_tensorrt_backend import FakeCuda, fake_backend
    from tests.test_unclip_device_step import U32P, _ptr

    class KarloFakeCuda(FakeCuda):
        def unclip_step(self, pred, latents, noise, sample_out, latent_shape, pred_channels, cfg, scale, k,
                        bad_step=0, step=0):
            b, c, h, w = latent_shape
            n, rows = b * c * h * w, (2 if cfg else 1) * b

            def run():
                self.kernel_launches += 1
                view = (lambda ptr, count: self.view(ptr, count * 4).view(np.float32) if ptr else None)
                flag = self.view(bad_step, 4).view(np.uint32)
                host_kernels.host_unclip_step(
                    _ptr(view(pred, rows * pred_channels * h * w)), _ptr(view(latents, n)), _ptr(view(noise, n)),
                    _ptr(view(sample_out, rows * c * h * w)), n, h * w, c, pred_channels, int(cfg), scale, k.a, k.b,
                    k.clip, k.c_x0, k.c_x, int(k.learned), k.std, k.min_log, k.max_log, _ptr(flag, U32P), step)
            self._do(run)

    root = tmp_path / "bundle"
    shutil.copytree(karlo_bundle, root)

    def make(low_memory=False):
        backend = fake_backend(root, low_memory=low_memory)
        backend.cuda = KarloFakeCuda()
        return backend
    return root, make


@pytest.mark.slow
@pytest.mark.parametrize("low_memory", [False, True], ids=["resident", "low-memory"])
@pytest.mark.parametrize("guidance", [8.0, 1.0], ids=["cfg", "no-cfg"])
def test_the_tensorrt_loops_equal_the_host_loops(trt_karlo, karlo_bundle, guidance, low_memory):
    """The TensorRT backends' Karlo loops (binding, CUDA-graph capture and replay, the switch to
    super_res_last, low-memory release) with the kernel's source give the host loops' results
    exactly; per step only the kernel's launch arguments come from the host."""
    from eclipse_export.runtime.pipeline import Pipeline

    root, make = trt_karlo
    backend = make(low_memory)
    device = Pipeline.from_bundle(root, backend)
    ref = _generate(Pipeline.from_bundle(karlo_bundle), guidance_scale=guidance)
    calls = []
    got = _generate(device, guidance_scale=guidance, progress=lambda d, n: calls.append((d, n)))
    for key in ("decoder.noise_pred_step0", "decoder.image_small", "super_res_first.noise_pred_step0",
                "super_res.image"):
        np.testing.assert_array_equal(got.intermediates[key], ref.intermediates[key], err_msg=key)
    np.testing.assert_array_equal(got.images, ref.images)
    cuda = backend.cuda
    assert cuda.kernel_launches == 4 + 7
    # replays: the decoder's steps after the first, super_res_first's 6 steps after the first;
    # super_res_last runs once, uncaptured
    assert cuda.graph_launches == (4 - 1) + (6 - 1)
    assert calls[-1] == (11, 11) and sorted(set(calls)) == calls
    if low_memory:
        assert all(s.engine is None for s in backend.sessions)


@pytest.mark.slow
def test_nan_in_the_tensorrt_karlo_loop_names_the_step(trt_karlo):
    from eclipse_export.runtime.backends.base import BackendError
    from eclipse_export.runtime.pipeline import Pipeline

    root, make = trt_karlo
    backend = make()
    pipe = Pipeline.from_bundle(root, backend)
    real = backend.cuda.unclip_step

    def poisoned(pred, latents, *a):  # the loop passes every argument, the step last
        if a[-1] == 2:  # NaN latents at step 2: the kernel flags step + 1 = 3
            backend.cuda._do(lambda: backend.cuda.view(latents, 4).view(np.float32).__setitem__(0, np.nan))
        real(pred, latents, *a)
    backend.cuda.unclip_step = poisoned
    with pytest.raises(BackendError, match="decoder loop produced NaN/Inf at step 3 of 4"):
        _generate(pipe, guidance_scale=8.0)


# --- on a GPU (bench/gpu window 1: gpu_verify.py GPU_TESTS) -----------------------------------------


def _ort_cuda_reason() -> str | None:
    from tests.test_ort_device_loop import _cuda_reason

    return _cuda_reason()


@pytest.mark.parametrize("kind", list(UNCLIP_KINDS))
def test_the_unclip_step_graphs_on_cuda_are_the_numpy_step(kind):
    """The step graphs through IO binding on CUDA memory: numpy's step within float32 rounding
    (CUDA's element-wise kernels and its double exp), NaN carried."""
    from tests.gpu_required import need

    need("ort-cuda", _ort_cuda_reason())
    import onnxruntime as ort

    from eclipse_export.export.step_graph import unclip_step_model

    cfg, learned = UNCLIP_KINDS[kind]
    s = ort.InferenceSession(unclip_step_model(cfg, learned).SerializeToString(), providers=["CUDAExecutionProvider"],
                             enable_fallback=0)
    config, per = CASES["decoder-learned" if learned else "super-res-fixed"]
    sched, pred, x, noise = _case(np.random.default_rng(6), config, per, cfg, shape=(2, 3, 64, 64))
    x[0, 0, 0, 0] = np.nan
    for i, t in enumerate(sched.timesteps):
        k = sched.step_terms(int(t), sched.prev_timestep(i))
        io = s.io_binding()
        feed = {"noise_pred": pred, "latents": x, "step_noise": noise[None], "params": unclip_params(k, 8.0 if cfg else None, 0)}
        if learned:
            feed["log_params"] = np.array([k.min_log, k.max_log], np.float64)
        for name, value in feed.items():
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for name in ("latents_next", "sample_next"):
            io.bind_output(name, "cuda")
        s.run_with_iobinding(io)
        got = io.copy_outputs_to_cpu()[0]
        want = chain_step(sched, pred, x, i, noise, 8.0 if cfg else None)
        assert np.isnan(got[0, 0, 0, 0])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"step {i}")


@pytest.mark.slow
def test_the_karlo_cuda_device_loops_match_the_cuda_host_loops(karlo_bundle):
    """On the GPU: Karlo's decoder and super-resolution loops on ONNX Runtime's CUDA provider
    (IO binding, the unCLIP step graphs) against the host loops on the same provider."""
    from tests.gpu_required import need

    need("ort-cuda", _ort_cuda_reason())
    from eclipse_export.runtime.pipeline import Pipeline

    host = Pipeline.from_bundle(karlo_bundle, OnnxRuntimeBackend(["cuda"], device_loop=False))
    backend = OnnxRuntimeBackend(["cuda"])
    assert backend.device_loop  # on by default on a GPU provider
    device = Pipeline.from_bundle(karlo_bundle, backend)
    for guidance in (8.0, 1.0):
        ref = _generate(host, guidance_scale=guidance)
        got = _generate(device, guidance_scale=guidance)
        for key in ("decoder.image_small", "super_res.image"):
            np.testing.assert_allclose(got.intermediates[key], ref.intermediates[key], rtol=1e-4, atol=1e-4, err_msg=key)
        assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1
    assert not backend.notes


# the TensorRT backends' Karlo loop on a real device, TensorRT replaced by a stand-in engine whose
# enqueue launches an NVRTC kernel (as tests/test_tensorrt_backend.py's kernel engine for Kandinsky)
KARLO_UNET = r"""
extern "C" __global__ void karlo_unet(const float* sample, const float* t, const float* cond, const int* mask,
                                      float* out, long long rows, long long c, long long oc, long long plane, float w) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * oc * plane) return;
    long long r = i / (oc * plane), ch = (i / plane) % oc, q = i % plane;
    float v = w * sample[(r * c + ch % c) * plane + q] + 1e-3f * t[0] + 0.1f * cond[r] + 0.01f * (float)mask[r];
    out[i] = v / (1.0f + fabsf(v));  // softsign: IEEE operations only, so numpy gives the same bits
}
"""
KARLO_IO = (("sample", np.float32, True), ("timestep", np.float32, True), ("cond", np.float32, True),
            ("mask", np.int32, True), ("noise_pred", np.float32, False))


def _karlo_unet_host(sample, t, cond, mask, oc, w):
    c = sample.shape[1]
    v = (np.float32(w) * sample[:, np.arange(oc) % c] + np.float32(1e-3) * np.float32(t)
         + np.float32(0.1) * cond[:, :, None, None] + np.float32(0.01) * mask.astype(np.float32)[:, :, None, None])
    return v / (np.float32(1) + np.abs(v))


class _KarloKernelContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.executions = engine, {}, {}, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name != "noise_pred":
            return self.shapes[name]
        rows, _, h, w = self.shapes["sample"]
        return (rows, self.engine.oc, h, w)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        import ctypes

        rows, c, h, w = self.shapes["sample"]
        a, p, ll = self.addresses, ctypes.c_void_p, ctypes.c_longlong
        args = ((a["sample"], a["timestep"], a["cond"], a["mask"], a["noise_pred"], rows, c, self.engine.oc, h * w,
                 self.engine.w), (p, p, p, p, p, ll, ll, ll, ll, ctypes.c_float))
        n = rows * self.engine.oc * h * w
        err, = self.engine.cuda.driver.cuLaunchKernel(self.engine.function, (n + 255) // 256, 1, 1, 256, 1, 1, 0,
                                                      stream, args, 0)
        self.executions += 1
        return int(err) == 0


class _KarloKernelEngine:
    def __init__(self, cuda, oc, w):
        from eclipse_export.runtime.backends.cuda import _ok, compile_kernel

        self.cuda, self.oc, self.w = cuda, oc, w
        _, image = compile_kernel(cuda.nvrtc, KARLO_UNET, "karlo_unet", cuda.info().sm)
        self.module = _ok(cuda.driver.cuModuleLoadData(image), "cuModuleLoadData(karlo_unet)")
        self.function = cuda._function(self.module, "karlo_unet")
        self.num_io_tensors = len(KARLO_IO)

    def get_tensor_name(self, i):
        return KARLO_IO[i][0]

    def get_tensor_dtype(self, name):
        return next(t for n, t, _ in KARLO_IO if n == name)

    def get_tensor_mode(self, name):
        return next("in" if i else "out" for n, _, i in KARLO_IO if n == name)

    def create_execution_context(self):
        return _KarloKernelContext(self)


WEIGHTS = {"decoder": 0.8, "super_res_first": 0.8, "super_res_last": 0.3}


def _kernel_karlo_backend(tmp_path, names, oc, low_memory):
    import types

    from eclipse_export.runtime.backends import tensorrt as tb
    from eclipse_export.runtime.backends.cuda import Cuda

    backend = tb.TensorRTBackend.__new__(tb.TensorRTBackend)
    backend.flavour, backend.low_memory, backend.cuda_graphs = "tensorrt", low_memory, True
    backend.runtime_cache_dir = None
    backend.cuda = Cuda(0)
    backend.device = backend.cuda.info()
    backend.trt = types.SimpleNamespace(nptype=np.dtype, TensorIOMode=types.SimpleNamespace(INPUT="in"))
    backend.runtime = types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: _KarloKernelEngine(backend.cuda, oc, WEIGHTS[data.decode()]))
    backend.name, backend._loop_buffers, backend.sessions, backend.warnings = "tensorrt", {}, [], []
    bundle = types.SimpleNamespace(root=tmp_path, path=lambda name: tmp_path / name)
    for name in names:
        (tmp_path / f"{name}.plan").write_bytes(name.encode())
        spec = types.SimpleNamespace(name=name, input_names=["sample", "timestep", "cond", "mask"],
                                     output_names=["noise_pred"])
        backend.sessions.append(tb.TrtSession(backend, spec, bundle, {"file": f"{name}.plan", "key": name, "profile": {}}))
    return backend


@pytest.mark.parametrize("loop", ["decoder-cfg", "decoder", "super-res-low-memory"])
def test_the_tensorrt_karlo_loop_on_a_gpu_with_kernel_engines_matches_the_host_loop(tmp_path, loop):
    """On the real device: trt_unclip_loop's buffers, constant uploads (float32 and int32), graph
    capture and replay, the unclip_step launches and the switch to super_res_last (low-memory: the
    first engine freed), against numpy's loop of the same functions; 1e-5 (the learned std's
    float64 exp may differ by an ulp from numpy's and the loop carries it)."""
    from tests.gpu_required import cuda_reason as _cuda_reason
    from tests.gpu_required import need

    need("cuda", _cuda_reason())
    learned, cfg = loop.startswith("decoder"), loop == "decoder-cfg"
    names = ["decoder"] if learned else ["super_res_first", "super_res_last"]
    sched, _, x, _ = _case(np.random.default_rng(8), DECODER_SCHEDULER if learned else SUPER_RES_SCHEDULER,
                           2 if learned else 1, cfg, shape=(1, 3, 32, 32))
    sched.set_timesteps(6)
    rows = 2 if cfg else 1
    noise = np.random.default_rng(9).standard_normal((6, *x.shape)).astype(np.float32)
    constants = {"cond": np.array([[-0.4], [0.7]][-rows:], np.float32), "mask": np.array([[3], [5]][-rows:], np.int32)}
    backend = _kernel_karlo_backend(tmp_path, names, 6 if learned else 3, low_memory=not learned)
    try:
        got = backend.denoise_unclip(backend.sessions, x, constants, sched, 8.0 if cfg else None, noise)
        want = x.copy()
        for i, t in enumerate(sched.timesteps):
            w = WEIGHTS[names[-1] if i == 5 else names[0]]
            sample = np.concatenate([want] * rows)
            pred = _karlo_unet_host(sample, t, constants["cond"], constants["mask"], 6 if learned else 3, w)
            want = chain_step(sched, pred, want, i, noise[i], 8.0 if cfg else None)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        if not learned:
            assert backend.sessions[0].engine is None  # freed at the switch (low-memory)
        assert backend.drain_warnings() == []
    finally:
        backend.close()
