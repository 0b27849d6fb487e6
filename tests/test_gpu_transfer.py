"""bench/gpu: the transfer to a GPU machine (prepare.py here, gpu_verify.py there), run end to
end on a small synthetic wheel: slimming (xz members), parts and manifest, staging with sha256
checks, reassembly, restoring members against the wheel's RECORD, pip --no-index install, and
the resumable step state machine. The real payload and the GPU steps are in bench/gpu/README.md.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

GPU_DIR = Path(__file__).resolve().parents[1] / "bench" / "gpu"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_gpu_{name}", GPU_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_verify = _module("gpu_verify")
sys.modules.setdefault("gpu_verify", gpu_verify)  # prepare.py imports it, as its neighbour
prepare = _module("prepare")


def _wheel(path: Path, dist: str = "fakepkg", big: bytes = b"") -> Path:
    files = {f"{dist}/__init__.py": b"VALUE = 42\n", f"{dist}/big.so": big,
             f"{dist}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n".encode(),
             f"{dist}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}

    def digest(data):
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{n},sha256={digest(d)},{len(d)}\n" for n, d in files.items()) + f"{dist}-1.0.dist-info/RECORD,,\n"
    wheel = path / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{dist}-1.0.dist-info/RECORD", record)
    return wheel


@pytest.fixture()
def transfer(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 4, 300_000, dtype=np.uint8).tobytes()  # compressible, like a library
    wheel = _wheel(tmp_path, big=big)
    out = tmp_path / "transfer"
    manifest = prepare.write_transfer(out, [(wheel, None)], part_bytes=40_000, xz_min_bytes=100_000)
    return out, manifest, big


def test_prepare_writes_parts_and_manifest(transfer):
    out, manifest, big = transfer
    parts = manifest["parts"]
    assert len(parts) >= 2 and [p["order"] for p in parts] == list(range(len(parts)))
    for p in parts:
        data = (out / "parts" / p["file"]).read_bytes()
        assert len(data) == p["bytes"] <= 40_000 and hashlib.sha256(data).hexdigest() == p["sha256"]
    (entry,) = manifest["wheels"]
    assert entry["file"].endswith(".slim") and [m["member"] for m in entry["members"]] == ["fakepkg/big.so"]
    assert sum(p["bytes"] for p in parts) < len(big)  # the member travelled xz-compressed
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not (out / "payload").exists() and not (out / "payload.tar").exists()


def test_stage_install_and_refusals(transfer, tmp_path, monkeypatch, capsys):
    out, manifest, big = transfer
    stage = tmp_path / "stage"
    monkeypatch.setenv("ECLIPSE_GPU_STAGE", str(stage))
    parts = [out / "parts" / p["file"] for p in manifest["parts"]]
    assert gpu_verify.main(["install", "--no-project"]) == 2  # nothing staged yet
    damaged = tmp_path / parts[0].name
    damaged.write_bytes(b"x" + parts[0].read_bytes()[1:])
    assert gpu_verify.main(["stage", str(out / "manifest.json"), str(damaged)]) == 2
    assert "transfer damaged" in capsys.readouterr().err
    for part in parts:  # one call per part, as through the device tool
        assert gpu_verify.main(["stage", str(out / "manifest.json"), str(part)]) == 0
    assert f"{len(parts)}/{len(parts)} parts staged" in capsys.readouterr().out
    assert gpu_verify.main(["install", "--no-project"]) == 0
    assert (stage / "site" / "fakepkg" / "big.so").read_bytes() == big
    state = json.loads((stage / "state.json").read_text())
    assert state["steps"]["install"]["status"] == "done"
    assert state["steps"]["install"]["installed"] == ["fakepkg-1.0-py3-none-any.whl"]


def test_restored_members_are_checked_against_record(transfer, tmp_path):
    out, manifest, _ = transfer
    entry = dict(manifest["wheels"][0])
    payload = tmp_path / "payload"
    payload.mkdir()
    import lzma
    import tarfile

    joined = b"".join((out / "parts" / p["file"]).read_bytes() for p in manifest["parts"])
    (tmp_path / "p.tar").write_bytes(joined)
    with tarfile.open(tmp_path / "p.tar") as tar:
        tar.extractall(payload)
    ok = gpu_verify.restore_wheel(entry, payload, tmp_path)
    with zipfile.ZipFile(ok) as z:
        assert z.testzip() is None
    xz = payload / entry["members"][0]["file"]
    xz.write_bytes(lzma.compress(b"not the library"))
    with pytest.raises(gpu_verify.VerifyError, match="does not match the wheel's RECORD"):
        gpu_verify.restore_wheel(entry, payload, tmp_path)


def test_torch_is_never_installed(tmp_path, monkeypatch):
    wheel = _wheel(tmp_path, dist="torch")
    out = tmp_path / "t"
    prepare.write_transfer(out, [(wheel, None)], part_bytes=1 << 20, xz_min_bytes=1 << 30)
    monkeypatch.setenv("ECLIPSE_GPU_STAGE", str(tmp_path / "stage"))
    assert gpu_verify.main(["stage", str(out / "manifest.json"), str(out / "parts" / "part-000")]) == 0
    with pytest.raises(gpu_verify.VerifyError, match="refusing to install torch"):
        gpu_verify.cmd_install(with_project=False)


def test_steps_resume_across_calls(tmp_path, monkeypatch, capsys):
    """Each call runs the pending steps that fit its budget; a step that asks to resume (an export
    cut short) runs again in the next call; a step failing twice is marked failed; outputs stay."""
    monkeypatch.setenv("ECLIPSE_GPU_STAGE", str(tmp_path / "stage"))
    calls = []

    def ok(stage, out, timeout):
        calls.append("a")
        (out / "result.txt").write_text("a")
        return {"ok": True}

    def resumes(stage, out, timeout):
        calls.append("b")
        return {"ok": True, "resume": calls.count("b") < 2}

    def fails(stage, out, timeout):
        calls.append("c")
        return {"ok": False}

    monkeypatch.setattr(gpu_verify, "STEPS", {"a": (ok, 1), "b": (resumes, 1), "c": (fails, 1), "d": (ok, 10_000)})
    assert gpu_verify.main(["run"]) == 2  # not installed
    assert gpu_verify.main(["run", "--installed", "--budget", "100"]) == 0
    assert calls == ["a", "b"]  # b asked to resume: the call stops there
    gpu_verify.main(["run", "--budget", "100"])
    assert calls == ["a", "b", "b", "c"]  # a is done; c failed once and stays pending; d does not fit
    gpu_verify.main(["run", "--budget", "100"])
    state = json.loads((tmp_path / "stage" / "state.json").read_text())["steps"]
    assert [state[k]["status"] for k in "abc"] == ["done", "done", "failed"] and "d" not in state
    assert (tmp_path / "stage" / "out" / "a" / "result.txt").read_text() == "a"
    dest = tmp_path / "OUT"
    assert gpu_verify.main(["collect", str(dest)]) == 0
    files = sorted(p.name for p in dest.iterdir())
    assert files == ["outputs.tar.gz", "summary.md"] and len(files) <= 8
    assert "## c: failed" in (dest / "summary.md").read_text()


def test_tensorrt_rtx_exports_only_where_the_gpu_is_a_target(tmp_path, monkeypatch):
    """H100/H200 (SM 9.0) are no TensorRT-RTX 1.7 target: the export step records why and builds
    the ONNX bundles only; an RTX card gets its engines for its own compute capability."""
    targets = ["NONE", "CURRENT", "SM75", "SM80", "SM86", "SM89", "SM120", "SM121"]
    rtx = {"version": "1.7.1.116", "targets": targets}
    name, reason = gpu_verify.rtx_target({"tensorrt_rtx": rtx, "torch": {"capability": [9, 0]}})
    assert name is None and reason.startswith("skipped: not supported") and "no SM90 target" in reason
    assert gpu_verify.rtx_target({"tensorrt_rtx": rtx, "torch": {"capability": [8, 9]}}) == ("SM89", "ok")

    monkeypatch.setenv("ECLIPSE_GPU_STAGE", str(tmp_path))
    exported = []
    monkeypatch.setattr(gpu_verify, "_export", lambda stage, out, preset, target, timeout, extra=():
                        exported.append((target, tuple(extra))) or {"status": "done"})
    for cap, want in (([9, 0], ["onnx", "onnx-fp16"]), ([12, 0], ["onnx", "onnx-fp16", "trt-rtx-fp16"])):
        state = gpu_verify.State(tmp_path)
        name, reason = gpu_verify.rtx_target({"tensorrt_rtx": rtx, "torch": {"capability": cap}})
        state.step("env").update(rtx_target=name, rtx_reason=reason)
        state.save()
        exported.clear()
        result = gpu_verify._exports("tiny")(tmp_path, tmp_path / "out", 600)
        assert [t for t, _ in exported] == want and result["ok"]
        if name is None:
            assert result["bundles"]["trt-rtx-fp16"]["status"].startswith("skipped: not supported")
        else:
            assert exported[-1][1][:2] == ("--compute-capability", "SM120")
