"""Gather what a bare GPU machine lacks, compressed and split for the transfer (run HERE).

The verification machine (README.md: an H200 with Python 3.12, PyTorch on CUDA 13, transformers,
onnx, CPU onnxruntime, cuda-bindings, NVRTC, cuDNN and cuBLAS wheels; no network) lacks only:
onnxruntime-gpu, diffusers (+ importlib_metadata, zipp), onnxconverter-common, open_clip_torch
(its BPE merges file only; installed --no-deps), Pillow, pytest (+ pluggy, iniconfig, pygments)
and the C++ CUDA check binary. A small package the machine has already (same major) is kept, not installed. Those go, into an
ignored folder (default bench/gpu/.transfer/):

    parts/part-NNN      the payload, split so each part is <= --part-mib (default 60 MiB)
    manifest.json       every part (file, size, sha256, order) and every payload file

The project itself is not in the payload: every remote command carries the working tree, and the
GPU side runs it from there (PYTHONPATH), so the code under test is always the tree of the call.
The machine's own NVIDIA CUDA / cuDNN / cuBLAS wheels serve ONNX Runtime's CUDA provider
(gpu_verify.py puts their lib folders on the loader path). Never torch, never NVIDIA's libraries.
`--tensorrt-rtx` adds TensorRT-RTX (RTX GPUs only: it has no SM 9.0 target) and `--cuda-python`
cuda-bindings + NVRTC, for GPU machines that lack them.

Wheels whose big shared libraries dominate are slimmed: each member over --xz-min-mib is stored
as its own `xz -9e` stream (ONNX Runtime's CUDA provider 270.9 -> ~177 MiB) and put back into the
wheel on the GPU machine, where every restored member is checked against the wheel's own RECORD
hashes (gpu_verify.py). The window plan allows at most MAX_PARTS parts (tests/test_gpu_transfer.py).

usage: python bench/gpu/prepare.py [--out DIR] [--part-mib 60] [--xz-threads N] [--check-binary PATH]
                                   [--tensorrt-rtx] [--cuda-python] [--keep-downloads]
"""

from __future__ import annotations

import argparse
import hashlib
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

# the receiving side defines the transfer format (run as a script, this folder is on sys.path)
from gpu_verify import FORMAT, FORMAT_VERSION, NEVER, sha256_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PYTHON = "3.12"  # the GPU machine's
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_34_x86_64", "manylinux_2_35_x86_64")

# (requirement, skip on the GPU machine when this distribution is already installed with the
# same major version). Pins: the versions this project was tested with.
PACKAGES = [
    ("onnxruntime-gpu==1.31.1", None),        # CUDA 13 build; its CUDA libraries are the machine's
    ("diffusers==0.42.1", None),
    ("importlib_metadata>=8", "importlib-metadata"),  # diffusers needs it
    ("zipp>=3.20", "zipp"),                    # importlib_metadata needs it
    ("onnxconverter-common==1.16.0", None),   # --target onnx-fp16
    ("open_clip_torch==3.3.0", None),         # the CLIP BPE merges file of the random presets
    ("pillow==12.0.0", "pillow"),               # the runtime's images (kept where the image has Pillow 12)
    ("pytest==9.2.0", "pytest"),               # the GPU tests (the image has no pytest)
    ("pygments==2.19.2", "pygments"),           # pytest 9 imports it
    ("pluggy==1.7.0", "pluggy"),
    ("iniconfig==2.3.1", "iniconfig"),
]
TENSORRT_RTX = [  # RTX GPUs only (TensorRT-RTX 1.7 has no SM 9.0 target)
    ("tensorrt-rtx==1.7.1.116", None),
    ("tensorrt_rtx_cu13==1.7.1.116", None),
    ("tensorrt_rtx_cu13_libs==1.7.1.116", None),
    ("tensorrt_rtx_cu13_bindings==1.7.1.116", None),
]
CUDA_PYTHON = [  # the trt-cu13 extra, for machines without them
    ("cuda-bindings>=13,<14", "cuda-bindings"),
    ("cuda-pathfinder>=1.1", "cuda-pathfinder"),
    ("nvidia-cuda-nvrtc>=13,<14", "nvidia-cuda-nvrtc"),
]
MAX_PARTS, MAX_PART_MIB = 4, 60.0  # window 1: one remote command per part (README)
CHECK_BINARY = REPO / "build" / "cpp" / "eclipse-cuda-check"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def download(req: str, dest: Path) -> Path:
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
           "--implementation", "cp", "-d", str(dest), "-q", req]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    if subprocess.run(cmd).returncode != 0:
        # tensorrt-rtx and tensorrt_rtx_cu13 are sdists only (meta-packages): build their wheel
        # here, which must come out pure Python to be any use on the GPU machine
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest), req], check=True)
        built = set(dest.iterdir()) - before
        if any(not p.name.endswith("-none-any.whl") for p in built):
            raise SystemExit(f"error: {req} has no wheel for the GPU machine and builds to {[p.name for p in built]}")
    new = set(dest.iterdir()) - before
    if not new:  # already there from an earlier run
        name = req.split("=")[0].split(">")[0].split("<")[0].replace("-", "_").lower()
        new = {p for p in dest.iterdir() if p.suffix == ".whl" and p.name.split("-")[0].lower() == name}
    if len(new) != 1:
        raise SystemExit(f"error: pip download {req} gave {sorted(p.name for p in new)}")
    return new.pop()


def dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def slim(wheel: Path, payload: Path, min_bytes: int, threads: int = 1, preset: str = "9e",
         cache: Path | None = None) -> dict:
    """Copy a wheel into the payload, its members over min_bytes as separate xz streams. cache:
    a folder of earlier xz streams by the member's RECORD sha256 and the preset (xz -9e of ONNX
    Runtime's CUDA provider takes tens of minutes on a busy machine; a re-run after a change of
    the small packages reuses it)."""
    with zipfile.ZipFile(wheel) as z:
        big = [i for i in z.infolist() if i.file_size >= min_bytes]
        # before the slim copy: writestr() below rewrites the shared ZipInfo offsets, after which
        # this archive can no longer read its members
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        hashes = dict(line.rsplit(",", 2)[:2] for line in z.read(record).decode().splitlines() if line.count(",") >= 2)
        entry = {"wheel": wheel.name, "sha256": sha256_file(wheel), "bytes": wheel.stat().st_size, "members": []}
        if not big:
            shutil.copy2(wheel, payload / wheel.name)
            entry["file"] = wheel.name
            return entry
        slim_name = wheel.name + ".slim"
        with zipfile.ZipFile(payload / slim_name, "w", zipfile.ZIP_DEFLATED) as out:
            for info in z.infolist():
                if info not in big:
                    out.writestr(info, z.read(info))
        entry["file"] = slim_name
        for info in big:
            raw = payload / (Path(info.filename).name + ".raw")
            digest = hashes.get(info.filename, "").replace("sha256=", "")
            cached = cache / f"{digest}.{preset}.xz" if cache and digest else None
            if cached and cached.is_file():
                shutil.copy2(cached, raw.with_name(raw.name + ".xz"))
                log(f"  {info.filename}: {info.file_size / 2**20:.1f} MiB -> {cached.stat().st_size / 2**20:.1f} MiB "
                    f"(xz -{preset}, cached)")
                entry["members"].append({"member": info.filename, "file": raw.name + ".xz", "bytes": info.file_size,
                                         "mode": info.external_attr >> 16})
                continue
            with z.open(info) as src, open(raw, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            t0 = time.perf_counter()
            xz = raw.with_name(raw.name + ".xz")
            if shutil.which("xz"):
                # -9e: these libraries are the transfer's bulk. Threads > 1 split the stream into
                # blocks: a little larger, much faster
                subprocess.run(["xz", f"-{preset}", f"-T{threads}", "-f", str(raw)], check=True)
            else:  # the same format from the standard library, one thread
                level = int(preset[0]) | (lzma.PRESET_EXTREME if preset.endswith("e") else 0)
                with open(raw, "rb") as src, lzma.open(xz, "wb", preset=level) as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                raw.unlink()
            log(f"  {info.filename}: {info.file_size / 2**20:.1f} MiB -> {xz.stat().st_size / 2**20:.1f} MiB "
                f"(xz -{preset}, {time.perf_counter() - t0:.0f} s)")
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(xz, cached)
            entry["members"].append({"member": info.filename, "file": xz.name, "bytes": info.file_size,
                                     "mode": info.external_attr >> 16})
    return entry


def write_transfer(out: Path, wheels: list[tuple[Path, str | None]], part_bytes: int, xz_min_bytes: int,
                   xz_threads: int = 1, binaries: list[Path] = (), xz_preset: str = "9e",
                   xz_cache: Path | None = None) -> dict:
    """Slim the wheels into out/payload, add the binaries (installed into STAGE/bin), tar them, cut
    the tar into out/parts, write the manifest."""
    payload, parts_dir = out / "payload", out / "parts"
    for d in (payload, parts_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    entries = []
    for w, skip in wheels:
        log(f"payload: {w.name} ({w.stat().st_size / 2**20:.1f} MiB)")
        e = slim(w, payload, xz_min_bytes, xz_threads, xz_preset, xz_cache)
        e.update({"dist": dist_name(w), "skip_if_installed_major": skip})
        entries.append(e)
    bins = []
    for f in binaries:
        if (payload / f.name).exists():
            raise SystemExit(f"error: two payload files named {f.name}")
        shutil.copy2(f, payload / f.name)
        bins.append({"file": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)})
        log(f"payload: {f.name} ({f.stat().st_size / 2**20:.1f} MiB, installed into STAGE/bin)")
    # one uncompressed tar (the contents are compressed already), cut into parts
    tar_path = out / "payload.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(payload.iterdir()):
            tar.add(f, arcname=f.name)
    parts = []
    with open(tar_path, "rb") as src:
        i = 0
        while block := src.read(part_bytes):
            name = f"part-{i:03d}"
            (parts_dir / name).write_bytes(block)
            parts.append({"file": name, "order": i, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
            i += 1
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repo_commit": commit, "repo_dirty": dirty, "python": PYTHON, "platforms": list(PLATFORMS), "cuda_major": 13,
        "payload": {"file": "payload.tar", "bytes": tar_path.stat().st_size,
                                            "sha256": sha256_file(tar_path)},
        "parts": parts, "wheels": entries, "binaries": bins,
        "files": {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(payload.iterdir())},
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    tar_path.unlink()
    shutil.rmtree(payload)
    return manifest


RECORD = Path(__file__).resolve().parent / "transfer-measured.json"


def measured_record(manifest: dict, seconds: dict | None = None, command: str = "") -> dict:
    """What the window plan's CI test holds (tests/test_gpu_transfer.py): the packages sent, the
    size of every part, each wheel before and after slimming, measured by a real run."""
    return {
        "measured": manifest["created"], "repo_commit": manifest["repo_commit"],
        "command": command or "python bench/gpu/prepare.py --record",
        "packages": [req for req, _ in PACKAGES], "parts": [p["bytes"] for p in manifest["parts"]],
        "binaries": [b["file"] for b in manifest.get("binaries", [])],
        "wheels": [{"wheel": w["wheel"], "bytes": w["bytes"],
                    "sent_bytes": manifest["files"][w["file"]]["bytes"] + sum(manifest["files"][m["file"]]["bytes"]
                                                                              for m in w["members"])}
                   for w in manifest["wheels"]],
        "seconds": seconds or {},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "gpu" / ".transfer")
    p.add_argument("--part-mib", type=float, default=MAX_PART_MIB)
    p.add_argument("--xz-min-mib", type=float, default=16.0, help="members at least this big are xz-compressed")
    p.add_argument("--xz-threads", type=int, default=1)
    p.add_argument("--xz-preset", default="9e", help="xz preset of the big members: 9e (smallest, slow) .. 6 (~4x faster)")
    p.add_argument("--check-binary", type=Path, default=CHECK_BINARY,
                   help="eclipse-cuda-check to carry (make cpp builds it); --check-binary '' for none")
    p.add_argument("--tensorrt-rtx", action="store_true", help="also TensorRT-RTX (RTX GPUs: no SM 9.0 target)")
    p.add_argument("--cuda-python", action="store_true", help="also cuda-bindings + NVRTC (machines without them)")
    p.add_argument("--keep-downloads", action="store_true")
    p.add_argument("--record", action="store_true", help=f"write the measured sizes to {RECORD.name} (commit it)")
    p.add_argument("--record-from", type=Path, metavar="MANIFEST", help="only write the record from a finished run")
    args = p.parse_args(argv)
    if args.record_from:
        RECORD.write_text(json.dumps(measured_record(json.loads(args.record_from.read_text())), indent=1) + "\n")
        print(f"wrote {RECORD}")
        return 0
    out = args.out
    binaries = []
    if str(args.check_binary) not in ("", "."):
        if not args.check_binary.is_file():
            raise SystemExit(f"error: {args.check_binary} is not built: make cpp (or --check-binary '' to leave it out)")
        binaries.append(args.check_binary)
    downloads = out / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wheels = []
    for req, skip in PACKAGES + (TENSORRT_RTX if args.tensorrt_rtx else []) + (CUDA_PYTHON if args.cuda_python else []):
        log(f"downloading {req}")
        wheels.append((download(req, downloads), skip))
    for w, _ in wheels:
        if dist_name(w) in NEVER:
            raise SystemExit(f"error: {w.name} must never be installed on the GPU machine")
    t1 = time.perf_counter()
    manifest = write_transfer(out, wheels, int(args.part_mib * 2**20), int(args.xz_min_mib * 2**20), args.xz_threads,
                              binaries, args.xz_preset, out / "xz-cache")
    if not args.keep_downloads:
        shutil.rmtree(downloads)
    parts = manifest["parts"]
    total = sum(p["bytes"] for p in parts)
    print(f"{len(parts)} parts, {total / 2**20:.1f} MiB in all, largest {max(p['bytes'] for p in parts) / 2**20:.1f} MiB "
          f"(downloads {t1 - t0:.0f} s, slimming + parts {time.perf_counter() - t1:.0f} s):")
    for p_ in parts:
        print(f"  {p_['file']}  {p_['bytes'] / 2**20:6.1f} MiB  {p_['sha256'][:16]}")
    print(f"manifest: {out / 'manifest.json'}")
    if args.record:
        seconds = {"downloads": round(t1 - t0), "slim_and_parts": round(time.perf_counter() - t1)}
        command = "python bench/gpu/prepare.py " + " ".join(argv if argv is not None else sys.argv[1:])
        RECORD.write_text(json.dumps(measured_record(manifest, seconds, command), indent=1) + "\n")
        print(f"wrote {RECORD}")
    if len(parts) > MAX_PARTS:
        print(f"warning: {len(parts)} parts, the window plan has {MAX_PARTS} (README: window 1)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
