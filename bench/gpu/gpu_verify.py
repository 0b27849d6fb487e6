"""The GPU verification, run ON the GPU machine (standard library only until installed).

    gpu_verify.py stage MANIFEST PART...   take carried parts into the stage folder, checking sha256
    gpu_verify.py install                  join + verify the parts, restore the wheels, install
                                           them next to the machine's own PyTorch (never torch)
    gpu_verify.py run [--budget S] [--only STEP,...]
                                           run the pending steps that fit in S seconds (default 540)
    gpu_verify.py status | collect [DIR]   state of every step | outputs into DIR (default $OUT)

Steps, in order (each resumable: state on disk, outputs kept under STAGE/out/<step>/):
    env          eclipse-doctor where the project has it, else nvidia-smi + a Python probe
    gpu-tests    the whole test suite: the tests that skip without a GPU run here (skips listed)
    export-tiny  tiny bundles: onnx, onnx-fp16, trt-rtx-fp16 (where TensorRT-RTX targets this GPU)
    bench-tiny   eclipse-bench: torch fp32/fp16 on CUDA, ONNX Runtime CUDA (device loop, no graphs,
                 host loop), ONNX Runtime TensorRT EP, TensorRT backend (graphs/no graphs/low memory)
    export-full  full-random bundles (12 GB each): onnx, onnx-fp16, trt-rtx-fp16 where supported
    bench-full   eclipse-bench on the full-random bundles (512x512, 20 steps)

Stage folder: $ECLIPSE_GPU_STAGE, else /root/eclipse-gpu (or /tmp/eclipse-gpu). Python packages go
to STAGE/site (pip --target, first on PYTHONPATH), so they sit next to the machine's PyTorch and
shadow its CPU onnxruntime; where the machine already has a package of the same major version
(cuda-bindings, NVRTC) the machine's own is kept.
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
        if e["dist"] == "eclipse-export" and (not with_project or (REPO / "pyproject.toml").is_file()):
            continue  # installed from this checkout below: the code under test is the tree that travelled
        log(f"restoring {e['wheel']}")
        to_install.append(restore_wheel(e, payload, wheels))
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), "-q"]
    if to_install:
        subprocess.run(pip + [str(w) for w in to_install], check=True)
    project = "checkout" if with_project else "not installed (--no-project)"
    if not with_project:
        pass
    elif (REPO / "pyproject.toml").is_file():
        subprocess.run(pip + ["--no-build-isolation", str(REPO)], check=True)
    else:
        project = "wheel"
        subprocess.run(pip + [str(restore_wheel(next(e for e in m["wheels"] if e["dist"] == "eclipse-export"),
                                                payload, wheels))], check=True)
    shutil.rmtree(payload)
    s = state.step("install")
    s.update(status="done", seconds=round(time.perf_counter() - t0, 1), skipped=skipped, project=project,
             installed=[w.name for w in to_install], finished=time.strftime("%H:%M:%S"))
    state.save()
    log(f"installed {len(to_install)} wheels + the project ({project}) into {site} in {s['seconds']} s; "
        f"kept the machine's: {', '.join(skipped) or 'nothing'}")


# --- steps ---------------------------------------------------------------------------------


def env_for(stage: Path) -> dict:
    env = dict(os.environ)
    site = stage / "site"
    if site.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["PATH"] = f"{site / 'bin'}{os.pathsep}{env['PATH']}"
        # cuda.pathfinder looks for NVIDIA's pip libraries in site-packages, not on PYTHONPATH: a
        # --target install is found through the loader's path instead
        libs = [str(d) for d in sorted(site.glob("nvidia/*/lib")) if d.is_dir()]
        if libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tool(name: str, stage: Path) -> list[str]:
    """A console script of the project, run by this interpreter (pip --target keeps no venv)."""
    modules = {"eclipse-export": "eclipse_export.cli.common:export_entry", "eclipse-bench": "eclipse_export.bench.runner:entry",
               "eclipse-doctor": "eclipse_export.cli.doctor:entry"}
    module, func = modules[name].split(":")
    return [sys.executable, "-c", f"import {module} as m; m.{func}()"]


def probe(stage: Path) -> dict:
    """What the GPU side of the project will meet: one subprocess with the staged packages."""
    code = r"""
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
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_for(stage), timeout=300)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (r.stdout + r.stderr)[-2000:]}


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


def run_logged(cmd: list[str], out_dir: Path, name: str, stage: Path, timeout: float) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    log("$ " + " ".join(cmd))
    with open(out_dir / f"{name}.log", "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env_for(stage), cwd=REPO, timeout=timeout)
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_verify] timed out after {timeout:.0f} s\n")
            return 124
    tail = (out_dir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
    log("\n".join("    " + line for line in tail))
    return p.returncode


def step_env(stage: Path, out: Path, timeout: float) -> dict:
    info = probe(stage)
    (out / "probe.json").write_text(json.dumps(info, indent=2))
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout if shutil.which("nvidia-smi") else "no nvidia-smi"
    (out / "nvidia-smi.txt").write_text(smi)
    doctor = None
    if (REPO / "eclipse_export" / "doctor.py").is_file():
        doctor = run_logged(tool("eclipse-doctor", stage), out, "doctor", stage, timeout)
    name, reason = rtx_target(info)
    return {"gpu": (info.get("torch") or {}).get("gpu") if isinstance(info.get("torch"), dict) else None,
            "rtx_target": name, "rtx_reason": reason, "doctor_rc": doctor,
            "ort_providers": (info.get("onnxruntime") or {}).get("providers") if isinstance(info.get("onnxruntime"), dict) else None}


def step_gpu_tests(stage: Path, out: Path, timeout: float) -> dict:
    """The whole suite, so that every test that skips without a GPU (whatever its file) runs
    here; its skip reasons and failures are the result. pytest-xdist spreads it where present."""
    import importlib.util

    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--durations=15",
           f"--junitxml={out / 'junit.xml'}"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    rc = run_logged(cmd, out, "pytest", stage, timeout)
    lines = (out / "pytest.log").read_text(errors="replace").splitlines()
    summary = next((line for line in reversed(lines) if " passed" in line or " failed" in line), "")
    return {"rc": rc, "summary": summary.strip("= "), "tests_ok": rc == 0,
            "skipped": [line for line in lines if line.startswith("SKIPPED")],
            "failed": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
            # a run cut short resumes; a finished run is the result, failures included (no re-run)
            "ok": True, "resume": rc == 124}


def _export(stage: Path, out: Path, preset: str, target: str, timeout: float, extra=()) -> dict:
    bundle = stage / "bundles" / f"{preset}-{target}"
    if (bundle / "manifest.json").is_file():
        return {"bundle": str(bundle), "status": "exists"}
    cmd = tool("eclipse-export", stage) + ["--preset", preset, "--target", target, "--out", str(bundle), "--overwrite",
                                           "--engine-cache", str(stage / "engine-cache"), *extra]
    rc = run_logged(cmd, out, f"export-{preset}-{target}", stage, timeout)
    return {"bundle": str(bundle), "status": "done" if rc == 0 else f"failed (exit {rc})"}


def _exports(preset: str):
    def step(stage: Path, out: Path, timeout: float) -> dict:
        state = State(stage)
        env_info = state.step("env")
        t_end = time.monotonic() + timeout
        results = {}
        for target in ("onnx", "onnx-fp16", "trt-rtx-fp16"):
            if target == "trt-rtx-fp16" and not env_info.get("rtx_target"):
                results[target] = {"status": env_info.get("rtx_reason") or "skipped: run the env step first"}
                continue
            extra = ("--compute-capability", env_info["rtx_target"], "--workspace-mib", "8192") if target.startswith("trt") else ()
            left = t_end - time.monotonic()
            if left < 30:
                results[target] = {"status": "pending (out of time in this call)"}
                continue
            results[target] = _export(stage, out, preset, target, left, extra)
        ok = all(r["status"] in ("done", "exists") or r["status"].startswith("skipped") for r in results.values())
        return {"bundles": results, "ok": ok, "resume": any(r["status"].startswith("pending") for r in results.values())}
    return step


def _bench(preset: str, extra: list[str]):
    def step(stage: Path, out: Path, timeout: float) -> dict:
        bundles = [stage / "bundles" / f"{preset}-{t}" for t in ("onnx", "onnx-fp16", "trt-rtx-fp16")]
        bundles = [b for b in bundles if (b / "manifest.json").is_file()]
        if not bundles:
            return {"ok": False, "error": f"no {preset} bundle: run export-{preset.split('-')[0]} first"}
        args = []
        for b in bundles:
            args += ["--bundle", str(b)]
        cmd = tool("eclipse-bench", stage) + args + ["--out", str(out / "results"), "--provider-set", "cuda",
                                                     "--provider-set", "tensorrt,cuda", *extra]
        rc = run_logged(cmd, out, "bench", stage, timeout)
        results = out / "results" / "results.json"
        summary = {"rc": rc, "ok": rc == 0, "bundles": [b.name for b in bundles]}
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


STEPS = {  # name -> (function, seconds it needs at least to be worth starting)
    "env": (step_env, 60),
    "gpu-tests": (step_gpu_tests, 300),
    "export-tiny": (_exports("tiny"), 120),
    "bench-tiny": (_bench("tiny", ["--gpu-variants", "--runs", "5", "--warmup", "2", "--batch", "1", "--batch", "2"]), 240),
    "export-full": (_exports("full-random"), 300),
    "bench-full": (_bench("full-random", ["--height", "512", "--width", "512", "--steps", "20", "--runs", "3",
                                          "--warmup", "1", "--batch", "1"]), 480),
}


def cmd_run(budget: float, only: list[str] | None, installed: bool = False) -> int:
    stage = stage_dir()
    state = State(stage)
    if installed and state.step("install").get("status") != "done":
        state.step("install").update(status="done", project="the current environment (--installed)")
        state.save()
    if state.step("install").get("status") != "done":
        raise VerifyError("install first (gpu_verify.py install), or run --installed where everything is installed")
    t_end = time.monotonic() + budget
    for name, (fn, need) in STEPS.items():
        if only and name not in only:
            continue
        s = state.step(name)
        if s["status"] == "done":
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
        result = fn(stage, out, left - 15)
        s.update(result)
        s["seconds"] = round(s.get("seconds", 0) + time.perf_counter() - t0, 1)
        s["status"] = "pending" if result.get("resume") else ("done" if result.get("ok", True) else
                                                               ("failed" if s["attempts"] >= 2 else "pending"))
        state.save()
        log(f"[{name}] {s['status']} in {time.perf_counter() - t0:.0f} s")
        if s["status"] == "pending":
            break
    cmd_status()
    return 0


def cmd_status() -> None:
    state = State(stage_dir())
    for name in ["install", *STEPS]:
        s = state.data["steps"].get(name, {"status": "pending"})
        log(f"{name:<12} {s['status']:<8} {s.get('seconds', '')}")


def cmd_collect(dest: Path) -> None:
    """At most 8 files come back from a device call: a summary, each bench's results.md/json and
    one archive of every step's logs and outputs (bundles excluded)."""
    stage = stage_dir()
    dest.mkdir(parents=True, exist_ok=True)
    state = State(stage)
    lines = ["# GPU verification", "", f"stage: {stage}", ""]
    for name in ["install", *STEPS]:
        s = state.data["steps"].get(name, {"status": "pending"})
        lines.append(f"## {name}: {s['status']}")
        lines.append("```\n" + json.dumps({k: v for k, v in s.items() if k != "status"}, indent=1)[:6000] + "\n```")
    (dest / "summary.md").write_text("\n".join(lines) + "\n")
    for name in ("bench-tiny", "bench-full"):
        for f in ("results.md", "results.json"):
            src = stage / "out" / name / "results" / f
            if src.is_file():
                shutil.copy2(src, dest / f"{name}-{f}")
    with tarfile.open(dest / "outputs.tar.gz", "w:gz") as tar:
        if (stage / "out").is_dir():
            tar.add(stage / "out", arcname="out")
        if (stage / "state.json").is_file():
            tar.add(stage / "state.json", arcname="state.json")
    log(f"collected into {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("manifest", type=Path)
    s.add_argument("parts", type=Path, nargs="+")
    i = sub.add_parser("install")
    i.add_argument("--no-project", action="store_true", help="do not install eclipse-export itself")
    r = sub.add_parser("run")
    r.add_argument("--budget", type=float, default=540.0)
    r.add_argument("--only", help="comma-separated steps")
    r.add_argument("--installed", action="store_true", help="no transfer: use what this environment has installed")
    sub.add_parser("status")
    c = sub.add_parser("collect")
    c.add_argument("dest", type=Path, nargs="?")
    args = p.parse_args(argv)
    stage_dir().mkdir(parents=True, exist_ok=True)
    try:
        if args.cmd == "stage":
            cmd_stage(args.manifest, args.parts)
        elif args.cmd == "install":
            cmd_install(not args.no_project)
        elif args.cmd == "run":
            return cmd_run(args.budget, args.only.split(",") if args.only else None, args.installed)
        elif args.cmd == "status":
            cmd_status()
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
