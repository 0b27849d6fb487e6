"""The GPU verification, run ON the GPU machine (standard library only until installed).

    gpu_verify.py stage MANIFEST PART...   take carried parts into the stage folder, checking sha256
    gpu_verify.py install                  join + verify the parts, restore the wheels, install them
                                           next to the machine's own PyTorch (never torch)
    gpu_verify.py window N [PART...]       the prepared script of window N (README): stage the last
                                           part(s), install, run the window's steps in its time
                                           budget, collect into $OUT
    gpu_verify.py run [--plan window1|window2] [--budget S] [--only STEP,...] [--installed] [--retry-failed]
                                           run the pending steps that fit in S seconds
    gpu_verify.py status | collect [DIR]   state of every step | outputs into DIR (default $OUT)

Steps (each resumable within a hold: state on disk, outputs under STAGE/out/<step>/):
    env          nvidia-smi, a probe (torch, ONNX Runtime, cuda-bindings, NVRTC), eclipse-doctor, and
                 an ONNX Runtime CUDA session that must really run on the GPU (a provider that does
                 not load FAILS the step: issue 18 #1)
    gpu-tests    the named GPU tests (GPU_TESTS) with ECLIPSE_GPU_REQUIRED: a missing GPU piece
                 fails them instead of skipping; every skip is listed with its reason
    export-tiny  tiny bundles: onnx, onnx-fp16 (+ trt-rtx-fp16 where TensorRT-RTX targets this GPU)
    bench-tiny   eclipse-bench: PyTorch on CUDA, ONNX Runtime CUDA (device loop with / without CUDA
                 graphs, host loop), parity and timings
    export-full  the full-random stack in FP16 (window 2)
    bench-full   eclipse-bench at 512x512, 20 steps, CFG, batch 1 (ORT CUDA device loop with CUDA
                 graphs vs PyTorch), peak device memory sampled with nvidia-smi
    torch-full   torch_unet.py: the UNet step in diffusers FP16 eager and torch.compile, the GPU's
                 measured FP16 peak, % of it, peak device memory

Stage folder: $ECLIPSE_GPU_STAGE, else /root/eclipse-gpu (or /tmp/eclipse-gpu). Python packages go
to STAGE/site (pip --target, first on PYTHONPATH, then this checkout), so they sit next to the
machine's PyTorch and shadow its CPU onnxruntime. The machine's own NVIDIA wheels (CUDA runtime,
cuBLAS, cuDNN, cuRAND, cuFFT, NVRTC: nvidia/*/lib of every site-packages folder) go on the loader
path of every step, which is how ONNX Runtime's CUDA provider (no RUNPATH) finds them.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FORMAT, FORMAT_VERSION = "eclipse-gpu-transfer", 1
NEVER = ("torch", "torchvision", "torchaudio", "triton")


class VerifyError(Exception):
    pass


# --- places and state ----------------------------------------------------------------------


def stage_dir() -> Path:
    env = os.environ.get("ECLIPSE_GPU_STAGE")
    if env:
        return Path(env)
    root = Path("/root")
    return root / "eclipse-gpu" if root.is_dir() and os.access(root, os.W_OK) else Path("/tmp/eclipse-gpu")


class State:
    """STAGE/state.json: what is done, when, and its outcome; rewritten atomically."""

    def __init__(self, stage: Path):
        self.path = stage / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"steps": {}}

    def step(self, name: str) -> dict:
        return self.data["steps"].setdefault(name, {"status": "pending", "attempts": 0})

    def save(self) -> None:
        tmp = self.path.with_name("state.json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def log(msg: str) -> None:
    print(msg, flush=True)


# --- transfer ------------------------------------------------------------------------------


def load_manifest(path: Path) -> dict:
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise VerifyError(f"{path} is not a transfer manifest this script reads ({m.get('format')} {m.get('format_version')})")
    return m


def cmd_stage(manifest: Path, parts: list[Path]) -> None:
    stage = stage_dir()
    (stage / "parts").mkdir(parents=True, exist_ok=True)
    m = load_manifest(manifest)
    old = stage / "manifest.json"
    if old.is_file() and load_manifest(old)["payload"]["sha256"] != m["payload"]["sha256"]:
        raise VerifyError(f"{old} is from another transfer: empty {stage} first")
    shutil.copy2(manifest, old)
    by_name = {p["file"]: p for p in m["parts"]}
    for part in parts:
        want = by_name.get(part.name)
        if want is None:
            raise VerifyError(f"{part.name} is not in the manifest")
        got = sha256_file(part)
        if got != want["sha256"] or part.stat().st_size != want["bytes"]:
            raise VerifyError(f"{part.name}: sha256/size differ from the manifest (transfer damaged): send it again")
        shutil.copy2(part, stage / "parts" / part.name)
        log(f"staged {part.name} ({want['bytes'] / 2**20:.1f} MiB, sha256 ok)")
    have = [p["file"] for p in m["parts"] if (stage / "parts" / p["file"]).is_file()]
    log(f"{len(have)}/{len(m['parts'])} parts staged in {stage}")


def record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    """member -> sha256 hex, from the wheel's RECORD (urlsafe base64 there)."""
    record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
    out = {}
    for line in zf.read(record).decode().splitlines():
        fields = line.rsplit(",", 2)
        if len(fields) == 3 and fields[1].startswith("sha256="):
            digest = fields[1][len("sha256="):]
            out[fields[0]] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return out


def restore_wheel(entry: dict, payload: Path, dest: Path) -> Path:
    """The wheel back from its slim zip + xz members, every member checked against RECORD."""
    out = dest / entry["wheel"]
    if not entry["members"]:
        shutil.copy2(payload / entry["file"], out)
    else:
        shutil.copy2(payload / entry["file"], out)
        with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED) as z:
            for mem in entry["members"]:
                info = zipfile.ZipInfo(mem["member"], date_time=(2020, 1, 1, 0, 0, 0))
                info.external_attr = (mem.get("mode") or 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                with lzma.open(payload / mem["file"]) as src, z.open(info, "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
    with zipfile.ZipFile(out) as z:
        hashes = record_hashes(z)
        members = [m["member"] for m in entry["members"]] or [n for n in z.namelist() if n in hashes][:3]
        for name in members:
            h = hashlib.sha256()
            with z.open(name) as f:
                while block := f.read(1 << 22):
                    h.update(block)
            if hashes.get(name) != h.hexdigest():
                raise VerifyError(f"{entry['wheel']}: {name} does not match the wheel's RECORD after restoring")
    if not entry["members"] and sha256_file(out) != entry["sha256"]:
        raise VerifyError(f"{entry['wheel']}: sha256 differs from the manifest")
    return out


def installed_major(dist: str) -> int | None:
    try:
        return int(md.version(dist).split(".")[0])
    except (md.PackageNotFoundError, ValueError):
        return None


def cmd_install(with_project: bool = True) -> None:
    """with_project: this checkout goes first on every step's PYTHONPATH (the code under test is
    the tree of the call; nothing of the project is installed)."""
    stage = stage_dir()
    state = State(stage)
    if not (stage / "manifest.json").is_file():
        raise VerifyError(f"nothing staged in {stage}: gpu_verify.py stage MANIFEST PART... first")
    m = load_manifest(stage / "manifest.json")
    missing = [p["file"] for p in m["parts"] if not (stage / "parts" / p["file"]).is_file()]
    if missing:
        raise VerifyError(f"parts missing in {stage / 'parts'}: {', '.join(missing)} (stage them first)")
    t0 = time.perf_counter()
    tar_path = stage / "payload.tar"
    h = hashlib.sha256()
    with open(tar_path, "wb") as out:
        for p in sorted(m["parts"], key=lambda p: p["order"]):
            data = (stage / "parts" / p["file"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != p["sha256"]:
                raise VerifyError(f"{p['file']} is damaged: stage it again")
            h.update(data)
            out.write(data)
    if h.hexdigest() != m["payload"]["sha256"]:
        raise VerifyError("the joined payload's sha256 differs from the manifest")
    payload = stage / "payload"
    shutil.rmtree(payload, ignore_errors=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(payload, filter="data") if sys.version_info >= (3, 12) else tar.extractall(payload)
    tar_path.unlink()
    for name, f in m["files"].items():
        if sha256_file(payload / name) != f["sha256"]:
            raise VerifyError(f"payload file {name} is damaged")
    wheels = stage / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    site = stage / "site"
    to_install, skipped = [], []
    for e in m["wheels"]:
        if e["dist"] in NEVER:
            raise VerifyError(f"{e['wheel']}: refusing to install {e['dist']} (the machine's own is used)")
        version_major = int(e["wheel"].split("-")[1].split(".")[0])
        if e.get("skip_if_installed_major") and installed_major(e["skip_if_installed_major"]) == version_major:
            skipped.append(f"{e['dist']} (machine has {md.version(e['skip_if_installed_major'])})")
            continue
        log(f"restoring {e['wheel']}")
        to_install.append(restore_wheel(e, payload, wheels))
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), "-q"]
    if to_install:
        subprocess.run(pip + [str(w) for w in to_install], check=True)
    bindir = stage / "bin"
    bindir.mkdir(exist_ok=True)
    binaries = []
    for b in m.get("binaries", []):
        shutil.copy2(payload / b["file"], bindir / b["file"])
        os.chmod(bindir / b["file"], 0o755)
        binaries.append(b["file"])
    shutil.rmtree(payload)
    shutil.rmtree(wheels)
    s = state.step("install")
    s.update(status="done", seconds=round(time.perf_counter() - t0, 1), skipped=skipped,
             project="this checkout on PYTHONPATH" if with_project else "not used (--no-project)",
             installed=[w.name for w in to_install], binaries=binaries, finished=time.strftime("%H:%M:%S"))
    state.save()
    log(f"installed {len(to_install)} wheels into {site} and {len(binaries)} binaries into {bindir} in "
        f"{s['seconds']} s; kept the machine's: {', '.join(skipped) or 'nothing'}")


# --- the environment of every step ---------------------------------------------------------


def site_dirs() -> list[Path]:
    """Every site-packages folder of this interpreter (the machine's own NVIDIA wheels live there)."""
    import site

    dirs = [*getattr(site, "getsitepackages", lambda: [])(), site.getusersitepackages()]
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    out = []
    for d in map(Path, dirs):
        if d.is_dir() and d not in out:
            out.append(d)
    return out


def nvidia_lib_dirs(roots: list[Path]) -> list[Path]:
    """nvidia/*/lib of each root: CUDA 13 wheels put the toolkit's libraries in nvidia/cu13/lib,
    cuDNN in nvidia/cudnn/lib, the CUDA 12 ones one folder per library. ONNX Runtime's CUDA
    provider has no RUNPATH and its preload looks beside onnxruntime only: without these on the
    loader path it does not load (issue 18 #1)."""
    out = []
    for root in roots:
        for d in sorted((root / "nvidia").glob("*/lib")):
            if d.is_dir() and any(d.glob("*.so*")) and d not in out:
                out.append(d)
    return out


def env_for(stage: Path, require_gpu: bool = True) -> dict:
    env = dict(os.environ)
    site = stage / "site"
    paths = ([str(site)] if site.is_dir() else []) + [str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if (site / "bin").is_dir():
        env["PATH"] = f"{site / 'bin'}{os.pathsep}{env['PATH']}"
    libs = [str(d) for d in nvidia_lib_dirs(([site] if site.is_dir() else []) + site_dirs())]
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    check = stage / "bin" / "eclipse-cuda-check"
    if check.is_file():
        env["ECLIPSE_CUDA_CHECK"] = str(check)
    if require_gpu:  # tests/gpu_required.py: these must run here, a skip is a failure
        env["ECLIPSE_GPU_REQUIRED"] = "cuda,ort-cuda"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tool(name: str) -> list[str]:
    """A console script of the project, run by this interpreter from the checkout."""
    return [sys.executable, "-m", {"eclipse-export": "eclipse_export.cli.export", "eclipse-bench": "eclipse_export.cli.bench",
                                   "eclipse-doctor": "eclipse_export.cli.doctor"}[name]]


PROBE = r"""
import json, importlib.util
out = {}
try:
    import torch
    out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.is_available() and torch.cuda.get_device_name(0),
                    "capability": torch.cuda.is_available() and list(torch.cuda.get_device_capability(0))}
except Exception as e:
    out["torch"] = repr(e)
try:
    import onnxruntime as ort
    out["onnxruntime"] = {"version": ort.__version__, "file": ort.__file__, "providers": ort.get_available_providers()}
except Exception as e:
    out["onnxruntime"] = repr(e)
try:
    import tensorrt_rtx as trt
    out["tensorrt_rtx"] = {"version": trt.__version__, "targets": [m for m in trt.ComputeCapability.__members__]}
except Exception as e:
    out["tensorrt_rtx"] = repr(e)
out["tensorrt"] = bool(importlib.util.find_spec("tensorrt"))
try:
    from cuda.bindings import runtime, nvrtc
    err, n = runtime.cudaGetDeviceCount()
    err2, major, minor = nvrtc.nvrtcVersion()
    out["cuda_bindings"] = {"device_count": n if int(err) == 0 else repr(err), "nvrtc": f"{major}.{minor}"}
except Exception as e:
    out["cuda_bindings"] = repr(e)
print(json.dumps(out))
"""

# ONNX Runtime's CUDA provider must really run here: a session of the step graph on the GPU,
# CPU fallback refused, one step through IO binding on device memory.
ORT_CUDA_CHECK = r"""
import json, sys
import numpy as np
out = {"ok": False}
try:
    import onnxruntime as ort
    from eclipse_export.export.step_graph import guided_step_model  # onnx is on the GPU machine
    out["version"], out["available"] = ort.__version__, ort.get_available_providers()
    s = ort.InferenceSession(guided_step_model(False).SerializeToString(), providers=["CUDAExecutionProvider"])
    out["session_providers"] = s.get_providers()
    shape = (1, 4, 8, 8)
    io = s.io_binding()
    for name, value in (("noise_pred", np.ones(shape, np.float32)), ("latents", np.ones(shape, np.float32)),
                        ("step_noise", np.zeros((1, *shape), np.float32)),
                        ("params", np.array([1, 1, 0.5, 1, 1, 0, 0, 0, 0], np.float32))):
        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for name in ("latents_next", "sample_next"):
        io.bind_output(name, "cuda")
    s.run_with_iobinding(io)
    got = io.copy_outputs_to_cpu()[0]
    out["result_ok"] = bool(np.allclose(got, 0.5))  # x0 = clamp((1 - 0.5 * 1) / 1, -1, 1), prev = x0
    out["ok"] = s.get_providers()[0] == "CUDAExecutionProvider" and out["result_ok"]
    if not out["ok"]:
        out["error"] = "ONNX Runtime fell back to the CPU: its CUDA provider did not load (see the log)"
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"[:2000]
print(json.dumps(out))
"""


def _child_json(code: str, stage: Path, timeout: float, log_to: Path | None = None) -> dict:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_for(stage), timeout=timeout,
                       cwd=REPO)
    if log_to is not None:
        log_to.write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": (r.stdout + r.stderr)[-2000:]}


def rtx_target(info: dict) -> tuple[str | None, str]:
    """(TensorRT-RTX compute capability name, reason) for this GPU."""
    rtx, torch_info = info.get("tensorrt_rtx"), info.get("torch")
    if not isinstance(rtx, dict):
        return None, f"skipped: tensorrt-rtx does not import: {rtx}"
    cap = torch_info.get("capability") if isinstance(torch_info, dict) else None
    if not cap:
        return None, "skipped: no GPU compute capability (torch sees no GPU)"
    name = f"SM{cap[0]}{cap[1]}"
    if name not in rtx["targets"]:
        return None, (f"skipped: not supported: TensorRT-RTX {rtx['version']} has no {name} target "
                      f"(its targets: {', '.join(rtx['targets'])}); this GPU is compute capability {cap[0]}.{cap[1]}")
    return name, "ok"


def run_logged(cmd: list[str], out_dir: Path, name: str, stage: Path, timeout: float, extra_env: dict | None = None) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    log("$ " + " ".join(cmd))
    with open(out_dir / f"{name}.log", "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**env_for(stage), **(extra_env or {})},
                               cwd=REPO, timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_verify] timed out after {timeout:.0f} s\n")
            return 124
    tail = (out_dir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
    log("\n".join("    " + line for line in tail))
    return p.returncode


# --- steps ---------------------------------------------------------------------------------


def step_env(stage: Path, out: Path, timeout: float) -> dict:
    info = _child_json(PROBE, stage, min(timeout, 120))
    (out / "probe.json").write_text(json.dumps(info, indent=2))
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout if shutil.which("nvidia-smi") else "no nvidia-smi"
    (out / "nvidia-smi.txt").write_text(smi)
    ort_cuda = _child_json(ORT_CUDA_CHECK, stage, min(timeout, 120), out / "ort-cuda.log")
    (out / "ort-cuda.json").write_text(json.dumps(ort_cuda, indent=2))
    doctor = run_logged(tool("eclipse-doctor"), out, "doctor", stage, min(timeout, 60))
    name, reason = rtx_target(info)
    torch_info = info.get("torch") if isinstance(info.get("torch"), dict) else {}
    return {"gpu": torch_info.get("gpu"), "capability": torch_info.get("capability"), "rtx_target": name,
            "rtx_reason": reason, "doctor_rc": doctor, "ort_cuda": ort_cuda,
            "loader_path": env_for(stage).get("LD_LIBRARY_PATH", "").split(os.pathsep),
            # a CUDA provider that does not load fails here, loudly (it used to make the ORT CUDA tests skip)
            "ok": bool(ort_cuda.get("ok"))}


# The tests that need the GPU, by node id: the files' CPU tests ran in CI already, and the C++
# build folders (cu12 check, generated sources) do not travel; the check binary does.
GPU_TESTS = (
    "tests/test_cuda_api.py::test_the_fused_step_on_the_gpu_is_numpy_bit_for_bit",
    "tests/test_cuda_api.py::test_the_fused_step_on_a_latent_of_64m_elements",
    "tests/test_cuda_api.py::test_a_captured_cuda_graph_replayed_n_times_equals_n_launches",
    "tests/test_tensorrt_backend.py::test_the_device_loop_on_a_gpu_with_a_kernel_engine_matches_the_host_loop",
    "tests/test_tensorrt_backend.py::test_low_memory_on_a_gpu_frees_the_engines_device_memory",
    "tests/test_tensorrt_backend.py::test_real_engines_on_the_gpu_match_onnx_runtime",  # skips: no TensorRT here
    "tests/test_cpp_tensorrt.py::test_the_cpp_cuda_layer_on_a_gpu",
    "tests/test_ort_device_loop.py::test_step_graph_on_cuda_is_apply_step",
    "tests/test_ort_device_loop.py::test_the_step_graph_on_cuda_copies_nothing_to_the_host",
    "tests/test_ort_device_loop.py::test_cuda_device_loop_matches_the_cuda_host_loop",
    # Karlo's device loops (issue 20 item 4): the unclip_step kernel through Cuda, the unCLIP step
    # graphs and the decoder + super-resolution loops on ONNX Runtime's CUDA provider (the C++
    # unclip_step runs in test_the_cpp_cuda_layer_on_a_gpu's "unclip_step cases")
    "tests/test_unclip_device_step.py::test_the_unclip_kernel_on_the_gpu_is_the_numpy_step",
    "tests/test_karlo_device_loop.py::test_the_unclip_step_graphs_on_cuda_are_the_numpy_step",
    "tests/test_karlo_device_loop.py::test_the_karlo_cuda_device_loops_match_the_cuda_host_loops",
    "tests/test_karlo_device_loop.py::test_the_tensorrt_karlo_loop_on_a_gpu_with_kernel_engines_matches_the_host_loop",
)


def pytest_summary(junit: Path) -> dict:
    """Counts, failures and every skip with its reason, from pytest's junit XML."""
    import xml.etree.ElementTree as ET

    out = {"passed": 0, "failed": [], "skipped": []}
    if not junit.is_file():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            out["failed"].append(f"{name}: {(bad.get('message') or '')[:400]}")
        elif skip is not None:
            out["skipped"].append(f"{name}: {(skip.get('message') or '')[:400]}")
        else:
            out["passed"] += 1
    return out


def step_gpu_tests(stage: Path, out: Path, timeout: float) -> dict:
    junit = out / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--durations=15",
           f"--junitxml={junit}", *GPU_TESTS]
    rc = run_logged(cmd, out, "pytest", stage, timeout)
    summary = pytest_summary(junit)
    return {"rc": rc, **summary, "ok": rc == 0 and not summary["failed"], "resume": rc == 124}


def _export(stage: Path, out: Path, preset: str, target: str, timeout: float, extra=()) -> dict:
    bundle = stage / "bundles" / f"{preset}-{target}"
    if (bundle / "manifest.json").is_file():
        return {"bundle": str(bundle), "status": "exists"}
    cmd = tool("eclipse-export") + ["--preset", preset, "--target", target, "--out", str(bundle), "--overwrite",
                                    "--engine-cache", str(stage / "engine-cache"), *extra]
    t0 = time.perf_counter()
    rc = run_logged(cmd, out, f"export-{preset}-{target}", stage, timeout)
    return {"bundle": str(bundle), "status": "done" if rc == 0 else f"failed (exit {rc})",
            "seconds": round(time.perf_counter() - t0, 1)}


def _exports(preset: str, targets: tuple[str, ...], extra: tuple[str, ...] = ()):
    def step(stage: Path, out: Path, timeout: float) -> dict:
        state = State(stage)
        env_info = state.step("env")
        t_end = time.monotonic() + timeout
        results = {}
        for target in targets:
            if target == "trt-rtx-fp16" and not env_info.get("rtx_target"):
                results[target] = {"status": env_info.get("rtx_reason") or "skipped: run the env step first"}
                continue
            more = ("--compute-capability", env_info["rtx_target"], "--workspace-mib", "8192") if target.startswith("trt") else ()
            left = t_end - time.monotonic()
            if left < 30:
                results[target] = {"status": "pending (out of time in this call)"}
                continue
            results[target] = _export(stage, out, preset, target, left, (*extra, *more))
        ok = all(r["status"] in ("done", "exists") or r["status"].startswith("skipped") for r in results.values())
        return {"bundles": results, "ok": ok, "resume": any(r["status"].startswith("pending") for r in results.values())}
    return step


class DeviceMemory:
    """Peak device memory used on GPU 0 while it runs (nvidia-smi every 100 ms): what ONNX
    Runtime's arenas, cuDNN workspaces and CUDA graphs hold, which no Python counter sees."""

    def __enter__(self):
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-i", "0", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.peak_mib = None
        if self.proc is not None:
            self.proc.terminate()
            values = [int(v) for v in self.proc.communicate(timeout=10)[0].split() if v.strip().isdigit()]
            self.peak_mib = max(values) if values else None
        return False


def _bench(preset: str, targets: tuple[str, ...], extra: list[str], memory: bool = False):
    def step(stage: Path, out: Path, timeout: float) -> dict:
        bundles = [stage / "bundles" / f"{preset}-{t}" for t in targets]
        bundles = [b for b in bundles if (b / "manifest.json").is_file()]
        if not bundles:
            return {"ok": False, "error": f"no {preset} bundle: run its export step first"}
        args = [a for b in bundles for a in ("--bundle", str(b))]
        cmd = tool("eclipse-bench") + args + ["--out", str(out / "results"), "--provider-set", "cuda", *extra]
        summary = {"bundles": [b.name for b in bundles]}
        t_end = time.monotonic() + timeout
        if memory:  # ours alone first: the process's peak device memory without PyTorch in it
            alone = tool("eclipse-bench") + args + ["--out", str(out / "memory-run"), "--provider-set", "cuda", *extra,
                                                     "--no-torch", "--runs", "1", "--warmup", "0"]
            with DeviceMemory() as mem:
                rc0 = run_logged(alone, out, "bench-memory", stage, timeout / 3)
            summary["ours_peak_device_mib"] = mem.peak_mib
            summary["memory_run_rc"] = rc0
        rc = run_logged(cmd, out, "bench", stage, t_end - time.monotonic())
        results = out / "results" / "results.json"
        summary.update(rc=rc, ok=rc == 0)
        if results.is_file():
            data = json.loads(results.read_text())
            summary["complete"] = data.get("complete")
            summary["targets"] = {k: ("skipped: " + e["skipped"]) if "skipped" in e else
                                  f"total p50 {e['latency']['total']['p50'] * 1e3:.1f} ms, "
                                  f"UNet/step {e['latency']['unet_per_step']['p50'] * 1e3:.2f} ms"
                                  for k, e in data["targets"].items()}
            summary["failures"] = data.get("failures")
        return summary
    return step


def step_torch_full(stage: Path, out: Path, timeout: float) -> dict:
    bundle = stage / "bundles" / "full-random-onnx-fp16"
    cmd = [sys.executable, str(HERE / "torch_unet.py"), "--preset", "full-random", "--height", "512", "--width", "512",
           "--out", str(out), "--ort-results", str(stage / "out" / "bench-full" / "results" / "results.json"),
           # each variant in its own child with its own limit, so that none outlives this step
           "--bundle", str(bundle), "--variant-timeout", str(max(30, int(timeout * 0.4)))]
    rc = run_logged(cmd, out, "torch_unet", stage, timeout)
    result = out / "torch_unet.json"
    return {"rc": rc, "ok": rc == 0, **({"result": json.loads(result.read_text())} if result.is_file() else {})}


# name -> (function, seconds it needs at least to be worth starting). Estimates for an H200 with
# 16 cores (no GPU was lent while writing them): README "Budget" has their reasoning.
STEPS = {
    "env": (step_env, 30),
    # 150 s for Kandinsky's, + 50 s for Karlo's (its tiny export, two generations per loop kind)
    "gpu-tests": (step_gpu_tests, 200),
    # --no-parity-check: the per-component ORT-vs-PyTorch check runs in CI; bench-tiny checks parity
    "export-tiny": (_exports("tiny", ("onnx", "onnx-fp16", "trt-rtx-fp16"), ("--no-parity-check",)), 90),
    "bench-tiny": (_bench("tiny", ("onnx", "onnx-fp16", "trt-rtx-fp16"),
                          ["--gpu-variants", "--height", "256", "--width", "256", "--steps", "4", "--runs", "5",
                           "--warmup", "2", "--batch", "1", "--batch", "2"]), 90),
    "export-full": (_exports("full-random", ("onnx-fp16",), ("--no-parity-check",)), 180),
    "bench-full": (_bench("full-random", ("onnx-fp16",), ["--height", "512", "--width", "512", "--steps", "20",
                                                          "--runs", "2", "--warmup", "1", "--batch", "1"],
                          memory=True), 130),
    "torch-full": (step_torch_full, 100),
}

# A window: one device-machine hold of 15 minutes in all, planned to 12 (margin for a slow start).
# start: the machine's start (1-2 min); stage_call: one remote call carrying a 60 MiB part (copy +
# sha256 + the call's own overhead); install: join, verify, restore, pip --target (rehearsed
# here, README); collect: the summary and the archive.
WINDOW = {"limit_s": 720, "start_s": 120, "stage_call_s": 25, "install_s": 45, "collect_s": 10}
PLANS = {
    "window1": ("env", "gpu-tests", "export-tiny", "bench-tiny"),
    "window2": ("env", "export-full", "bench-full", "torch-full"),
}


def plan_budget(plan: str, parts: int) -> dict:
    """The window's arithmetic: what the script may spend on its steps after the start, the
    staging calls and the install, and what the steps need at least."""
    w = WINDOW
    overhead = w["start_s"] + parts * w["stage_call_s"] + w["install_s"] + w["collect_s"]
    need = sum(STEPS[s][1] for s in PLANS[plan])
    return {"limit_s": w["limit_s"], "overhead_s": overhead, "steps_min_s": need, "script_budget_s": w["limit_s"] - overhead,
            "fits": overhead + need <= w["limit_s"]}


def cmd_run(budget: float, only: list[str] | None, installed: bool = False, plan: str | None = None,
            retry_failed: bool = False) -> int:
    stage = stage_dir()
    state = State(stage)
    if installed and state.step("install").get("status") != "done":
        state.step("install").update(status="done", project="the current environment (--installed)")
        state.save()
    if state.step("install").get("status") != "done":
        raise VerifyError("install first (gpu_verify.py install), or run --installed where everything is installed")
    names = PLANS[plan] if plan else tuple(STEPS)
    t_end = time.monotonic() + budget
    for name in names:
        fn, need = STEPS[name]
        if only and name not in only:
            continue
        s = state.step(name)
        if s["status"] == "done" or (s["status"] == "failed" and not retry_failed):
            continue
        left = t_end - time.monotonic()
        if left < need:
            log(f"[{name}] needs ~{need} s, {left:.0f} s left in this call: next call")
            break
        out = stage / "out" / name
        out.mkdir(parents=True, exist_ok=True)
        log(f"[{name}] starting ({left:.0f} s left)")
        t0 = time.perf_counter()
        s["attempts"] += 1
        result = fn(stage, out, left - 10)
        s.update(result)
        s["seconds"] = round(s.get("seconds", 0) + time.perf_counter() - t0, 1)
        # a failed step is recorded and the window goes on (its time is the scarce thing); a step
        # cut short resumes in the next call
        s["status"] = "pending" if result.get("resume") else ("done" if result.get("ok", True) else "failed")
        state.save()
        log(f"[{name}] {s['status']} in {time.perf_counter() - t0:.0f} s")
        if s["status"] == "pending":
            break
    cmd_status()
    return 0


def cmd_window(n: int, manifest: Path | None, parts: list[Path]) -> int:
    """Window n's last remote command: stage what it carries, install, run the plan in the
    script's budget, collect into $OUT."""
    t0 = time.monotonic()
    plan = f"window{n}"
    if parts:
        cmd_stage(manifest, parts)
    stage = stage_dir()
    m = load_manifest(stage / "manifest.json")
    if State(stage).step("install").get("status") != "done":
        cmd_install()
    # what is left of the window: the start and the earlier staging calls are spent, this call's
    # staging and install too (measured), the collect is kept back
    w = WINDOW
    budget = (w["limit_s"] - w["start_s"] - (len(m["parts"]) - len(parts)) * w["stage_call_s"] - w["collect_s"]
              - (time.monotonic() - t0))
    log(f"[{plan}] {budget:.0f} s for the steps ({', '.join(PLANS[plan])})")
    cmd_run(budget, None, plan=plan)
    dest = Path(os.environ["OUT"]) if os.environ.get("OUT") else stage / "collected"
    cmd_collect(dest)
    return 0


def cmd_status() -> None:
    state = State(stage_dir())
    for name in ["install", *STEPS]:
        s = state.data["steps"].get(name, {"status": "pending"})
        log(f"{name:<12} {s['status']:<8} {s.get('seconds', '')}")


def cmd_collect(dest: Path) -> None:
    """A few files come back from a device call: a summary, each bench's results.md/json, the
    torch comparison and one archive of every step's logs and outputs (bundles excluded)."""
    stage = stage_dir()
    dest.mkdir(parents=True, exist_ok=True)
    state = State(stage)
    lines = ["# GPU verification", "", f"stage: {stage}", ""]
    for name in ["install", *STEPS]:
        s = state.data["steps"].get(name)
        if s is None:
            continue
        lines.append(f"## {name}: {s['status']}")
        if s.get("failed"):
            lines += ["failed:"] + [f"- {f}" for f in s["failed"]]
        if s.get("skipped") and name == "gpu-tests":
            lines += ["skipped (with the reason):"] + [f"- {f}" for f in s["skipped"]]
        lines.append("```\n" + json.dumps({k: v for k, v in s.items() if k not in ("status", "failed", "skipped")},
                                          indent=1)[:6000] + "\n```")
    (dest / "summary.md").write_text("\n".join(lines) + "\n")
    for name in ("bench-tiny", "bench-full"):
        for f in ("results.md", "results.json"):
            src = stage / "out" / name / "results" / f
            if src.is_file():
                shutil.copy2(src, dest / f"{name}-{f}")
    src = stage / "out" / "torch-full" / "torch_unet.md"
    if src.is_file():
        shutil.copy2(src, dest / "torch_unet.md")
    name, text = results_page(state, stage)
    (dest / name).write_text(text)
    with tarfile.open(dest / "outputs.tar.gz", "w:gz") as tar:
        if (stage / "out").is_dir():
            tar.add(stage / "out", arcname="out")
        if (stage / "state.json").is_file():
            tar.add(stage / "state.json", arcname="state.json")
    log(f"collected into {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")


def results_page(state: "State", stage: Path) -> tuple[str, str]:
    """bench/gpu/results/<gpu>-<date>.md, ready to commit: what ran, what failed and was skipped
    (with the reasons), the figures, the commands."""
    env = state.data["steps"].get("env", {})
    gpu = str(env.get("gpu") or "unknown-gpu")
    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    date = time.strftime("%Y-%m-%d")
    lines = [f"# GPU verification on {gpu}, {date}", "",
             "Made by `bench/gpu/gpu_verify.py collect` (bench/gpu/README.md has the plan and the commands).", "",
             "| step | state | seconds |", "| --- | --- | ---: |"]
    for step in ["install", *STEPS]:
        s = state.data["steps"].get(step)
        if s is not None:
            lines.append(f"| {step} | {s['status']} | {s.get('seconds', '')} |")
    for step, s in state.data["steps"].items():
        for key in ("failed", "skipped"):
            if s.get(key) and isinstance(s[key], list):
                lines += ["", f"{step}, {key}:"] + [f"- {x}" for x in s[key]]
    if env.get("ort_cuda"):
        lines += ["", f"ONNX Runtime CUDA session: `{json.dumps(env['ort_cuda'])[:600]}`"]
    for step, label in (("bench-tiny", "tiny"), ("bench-full", "full size")):
        src = stage / "out" / step / "results" / "results.md"
        if src.is_file():
            lines += ["", f"## eclipse-bench, {label}", "", src.read_text()]
        peak = state.data["steps"].get(step, {}).get("ours_peak_device_mib")
        if peak:
            lines.append(f"Peak device memory of our targets alone (nvidia-smi): {peak} MiB")
    src = stage / "out" / "torch-full" / "torch_unet.md"
    if src.is_file():
        lines += ["", src.read_text()]
    return f"{slug}-{date}.md", "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("manifest", type=Path)
    s.add_argument("parts", type=Path, nargs="+")
    i = sub.add_parser("install")
    i.add_argument("--no-project", action="store_true", help="do not put this checkout on PYTHONPATH")
    w = sub.add_parser("window")
    w.add_argument("n", type=int, choices=[1, 2])
    w.add_argument("manifest", type=Path, nargs="?")
    w.add_argument("parts", type=Path, nargs="*")
    r = sub.add_parser("run")
    r.add_argument("--budget", type=float, default=540.0)
    r.add_argument("--plan", choices=sorted(PLANS))
    r.add_argument("--only", help="comma-separated steps")
    r.add_argument("--installed", action="store_true", help="no transfer: use what this environment has installed")
    r.add_argument("--retry-failed", action="store_true", help="run failed steps again")
    sub.add_parser("status")
    b = sub.add_parser("budget")
    b.add_argument("--parts", type=int, default=4)
    c = sub.add_parser("collect")
    c.add_argument("dest", type=Path, nargs="?")
    args = p.parse_args(argv)
    stage_dir().mkdir(parents=True, exist_ok=True)
    try:
        if args.cmd == "stage":
            cmd_stage(args.manifest, args.parts)
        elif args.cmd == "install":
            cmd_install(not args.no_project)
        elif args.cmd == "window":
            if args.parts and args.manifest is None:
                raise VerifyError("window N MANIFEST PART...")
            return cmd_window(args.n, args.manifest, args.parts)
        elif args.cmd == "run":
            return cmd_run(args.budget, args.only.split(",") if args.only else None, args.installed, args.plan,
                           args.retry_failed)
        elif args.cmd == "status":
            cmd_status()
        elif args.cmd == "budget":
            for plan in PLANS:
                log(f"{plan}: {json.dumps(plan_budget(plan, args.parts))}")
        else:
            dest = args.dest or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
            if dest is None:
                raise VerifyError("collect needs a folder (or $OUT)")
            cmd_collect(dest)
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
