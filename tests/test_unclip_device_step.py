"""Karlo's device step (issue 20 item 4): the unclip_step kernel (runtime/backends/kernels/
guided_step.cu) against numpy's UnCLIPScheduler.step after the chain's guidance, for both
variance types (the decoder's learned_range, the super-resolution's fixed_small_log).

- Without a GPU: the kernel source compiled as C++ for the host (tests/data/kernel_host.cpp,
  -ffp-contract=off like NVRTC's --fmad=false) runs its arithmetic, indexing and operation order
  bit for bit against numpy; NVRTC (cuda.bindings' and both wheels' majors, tests/test_cuda_api.py
  compiles the whole source per architecture) compiles the entry point.
- On a GPU (bench/gpu/gpu_verify.py): the same cases through the runtime's own Cuda.unclip_step.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from eclipse_export.families.karlo.presets import DECODER_SCHEDULER_KARLO, SUPER_RES_SCHEDULER_KARLO
from eclipse_export.runtime import guidance
from eclipse_export.runtime.backends.cuda import compile_kernel, kernel_source
from eclipse_export.runtime.schedulers import StepCoefficients, apply_step
from eclipse_export.runtime.unclip_scheduler import UnCLIPScheduler

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "eclipse_export/runtime/backends/kernels/guided_step.cu"
F32P = ctypes.POINTER(ctypes.c_float)
U32P = ctypes.POINTER(ctypes.c_uint)


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    return build_host_kernels(tmp_path_factory)


def build_host_kernels(tmp_path_factory) -> ctypes.CDLL:
    """tests/data/kernel_host.cpp with the kernels' source, built and loaded."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler for the host build of the kernels: apt-get install g++")
    out = tmp_path_factory.mktemp("kernel-host") / "kernels.so"
    subprocess.run([cxx, "-O2", "-ffp-contract=off", "-Wall", "-Werror", "-shared", "-fPIC",
                    f'-DKERNEL_SOURCE="{KERNELS}"', "-o", str(out), str(ROOT / "tests/data/kernel_host.cpp")],
                   check=True)
    lib = ctypes.CDLL(str(out))
    lib.host_unclip_step.argtypes = [F32P, F32P, F32P, F32P, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_float,
                                     ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_float,
                                     ctypes.c_double, ctypes.c_double, U32P, ctypes.c_uint]
    lib.host_guided_step.argtypes = [F32P, F32P, F32P, F32P, ctypes.c_longlong, ctypes.c_int] + [ctypes.c_float] * 8 + [
        U32P, ctypes.c_uint]
    return lib


def _ptr(a: np.ndarray | None, kind=F32P):
    return ctypes.cast(a.ctypes.data, kind) if a is not None else None


def host_unclip_step(lib, pred, x, noise, pred_channels, cfg, scale, k, step):
    """One launch of the host-built unclip_step; returns (latents, sample_out, NaN flag)."""
    latents, sample = x.copy(), np.zeros((2 if cfg else 1) * x.size, np.float32)
    flag = np.zeros(1, np.uint32)
    _, c, h, w = x.shape
    lib.host_unclip_step(_ptr(pred), _ptr(latents), _ptr(noise if k.noise else None), _ptr(sample), x.size, h * w, c,
                         pred_channels, int(cfg), scale, k.a, k.b, k.clip, k.c_x0, k.c_x, int(k.learned), k.std,
                         k.min_log, k.max_log, _ptr(flag, U32P), step)
    return latents, sample, int(flag[0])


def chain_step(sched: UnCLIPScheduler, pred, x, i, noise, scale):
    """The host loops' step (runtime/chains/karlo.py): guidance on the first C channels of
    [uncond; cond], the variance channels of the conditional half."""
    c = x.shape[1]
    t = int(sched.timesteps[i])
    if scale is not None:
        uncond, cond = np.split(pred, 2, axis=0)
        eps = guidance.combine(np.concatenate([uncond[:, :c], cond[:, :c]]), scale)
        pred = np.concatenate([eps, cond[:, c:]], axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        return sched.step(pred, t, x, sched.prev_timestep(i), noise)


CASES = {  # name: (scheduler config, prediction channels per latent channel)
    "decoder-learned": (DECODER_SCHEDULER_KARLO, 2),
    "super-res-fixed": (SUPER_RES_SCHEDULER_KARLO, 1),
    "no-clip": ({**DECODER_SCHEDULER_KARLO, "clip_sample": False}, 2),
}


def _case(rng, config, per, cfg, shape=(2, 3, 8, 8)):
    sched = UnCLIPScheduler(config)
    sched.set_timesteps(5)
    rows = (2 if cfg else 1) * shape[0]
    pred = (2 * rng.standard_normal((rows, per * shape[1], *shape[2:]))).astype(np.float32)
    pred[:, shape[1]:] = np.tanh(pred[:, shape[1]:])  # a variance channel's range
    x = (3 * rng.standard_normal(shape)).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    return sched, pred, x, noise


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_unclip_kernel_on_the_host_is_the_numpy_step_bit_for_bit(host_kernels, case, cfg):
    """Every step of a 5-step schedule (the last adds no noise), through the kernel's source."""
    config, per = CASES[case]
    rng = np.random.default_rng(5)
    sched, pred, x, noise = _case(rng, config, per, cfg)
    scale = 8.0 if cfg else None
    for i, t in enumerate(sched.timesteps):
        k = sched.step_terms(int(t), sched.prev_timestep(i))
        want = chain_step(sched, pred, x, i, noise, scale)
        got, sample, flag = host_unclip_step(host_kernels, pred, x, noise, per * x.shape[1], cfg, scale or 1.0, k, i)
        np.testing.assert_array_equal(got, want, err_msg=f"step {i} (t={t})")
        np.testing.assert_array_equal(sample.reshape(-1, *x.shape[1:]), np.concatenate([want] * (2 if cfg else 1)))
        assert flag == 0
        assert k.noise == (i + 1 < len(sched.timesteps))


def test_the_unclip_kernel_flags_the_first_non_finite_step_and_keeps_nan(host_kernels):
    rng = np.random.default_rng(2)
    sched, pred, x, noise = _case(rng, DECODER_SCHEDULER_KARLO, 2, True)
    x[0, 0, 0, 0] = np.nan
    k = sched.step_terms(int(sched.timesteps[1]), sched.prev_timestep(1))
    got, _, flag = host_unclip_step(host_kernels, pred, x, noise, 6, True, 8.0, k, 1)
    assert np.isnan(got[0, 0, 0, 0]) and flag == 2
    np.testing.assert_array_equal(got, chain_step(sched, pred, x, 1, noise, 8.0))


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
def test_the_kandinsky_kernel_on_the_host_is_apply_step(host_kernels, cfg):
    """The same host build runs guided_step against schedulers.apply_step (the GPU test's
    statement), so this harness is checked on a kernel with a GPU-verified twin."""
    rng = np.random.default_rng(9)
    n = 4096
    x = (3 * rng.standard_normal(n)).astype(np.float32)
    pred = rng.standard_normal((2 if cfg else 1) * n).astype(np.float32)
    noise = rng.standard_normal(n).astype(np.float32)
    k = StepCoefficients(0.31, 0.95, 1.0, 0.52, 0.47, 0.02, 0.11)
    latents, sample, flag = x.copy(), np.zeros_like(pred), np.zeros(1, np.uint32)
    host_kernels.host_guided_step(_ptr(pred), _ptr(latents), _ptr(noise), _ptr(sample), n, int(cfg), 5.5,
                                  *k.astuple(), _ptr(flag, U32P), 0)
    eps = guidance.combine(pred.reshape(2, -1), 5.5).reshape(-1) if cfg else pred
    np.testing.assert_array_equal(latents, apply_step(k, eps, x, noise))


def test_nvrtc_compiles_the_unclip_entry_point_without_nan_dropping_min_max():
    """The PTX has the entry point with its 21 parameters (the launchers' argument lists) and,
    like guided_step, no min/max.f32 (they return the bound for NaN; np.clip keeps NaN)."""
    from cuda.bindings import nvrtc

    archs = nvrtc.nvrtcGetSupportedArchs()[1]
    kind, ptx = compile_kernel(nvrtc, kernel_source("guided_step"), "guided_step", max(archs) + 500)
    text = ptx.decode()
    entry = re.search(r"\.entry unclip_step\((.*?)\)", text, re.DOTALL)
    assert kind == "ptx" and entry
    assert entry.group(1).count(".param") == 21
    assert not re.findall(r"\b(?:min|max)(?!\.NaN)[.\w]*\.f32", text)


# --- on a GPU: the same through the runtime's Cuda ------------------------------------------------



@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_unclip_kernel_on_the_gpu_is_the_numpy_step(cuda, case, cfg):
    """Bit for bit except the learned std's float64 exp (libdevice's vs numpy's, rounded to
    float32 after): at most 1 ulp there, and the count of such elements is reported."""
    from eclipse_export.runtime.backends.cuda import DeviceBuffer

    config, per = CASES[case]
    rng = np.random.default_rng(5)
    sched, pred, x, noise = _case(rng, config, per, cfg, shape=(2, 3, 64, 64))
    scale = 8.0 if cfg else None
    bufs = {k: DeviceBuffer(cuda) for k in ("pred", "x", "noise", "sample", "bad")}
    try:
        for name, nbytes in (("pred", pred.nbytes), ("x", x.nbytes), ("noise", noise.nbytes),
                             ("sample", 2 * x.nbytes), ("bad", 4)):
            bufs[name].ensure(nbytes)
        cuda.h2d(bufs["pred"].ptr, pred)
        cuda.h2d(bufs["noise"].ptr, noise)
        for i, t in enumerate(sched.timesteps):
            k = sched.step_terms(int(t), sched.prev_timestep(i))
            cuda.h2d(bufs["x"].ptr, x)
            cuda.h2d(bufs["bad"].ptr, np.zeros(1, np.uint32))
            cuda.unclip_step(bufs["pred"].ptr, bufs["x"].ptr, bufs["noise"].ptr if k.noise else 0, bufs["sample"].ptr,
                             x.shape, per * x.shape[1], cfg, scale or 1.0, k, bufs["bad"].ptr, i)
            got, flag = np.empty_like(x), np.zeros(1, np.uint32)
            cuda.d2h(got, bufs["x"].ptr)
            cuda.d2h(flag, bufs["bad"].ptr)
            cuda.synchronize()
            want = chain_step(sched, pred, x, i, noise, scale)
            if k.learned and k.noise:
                ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32))
                assert ulps.max() <= 1, f"step {i}: {int((ulps > 0).sum())} elements differ, max {ulps.max()} ulp"
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"step {i}")
            assert flag[0] == 0
    finally:
        for b in bufs.values():
            b.free()
