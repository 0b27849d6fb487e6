"""eclipse-doctor: what this machine can build and run, and whether a bundle's engines fit it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eclipse_export.cli.doctor import diagnose, main, render
from eclipse_export.runtime.backends.gpu_probe import Check, CudaProbe, Gpu, cuda_probe
from eclipse_export.runtime.backends.onnxruntime import ORT_PROVIDERS
from eclipse_export.runtime.bundle import file_entry


def _checks(report, section_start: str) -> list[Check]:
    return next(s.checks for s in report.sections if s.title.startswith(section_start))


def test_this_machine(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for heading in ("machine", "packages", "build targets", "backends"):
        assert f"\n{heading}" in "\n" + out
    probe = cuda_probe()
    report = diagnose(probe=probe)
    build = {c.name: c for c in _checks(report, "build targets")}
    assert build["onnx"].ok  # the test environment has the export extras
    if not probe.gpus:
        assert "no usable CUDA GPU" in out
        assert not build["trt-fp16"].ok and build["trt-fp16"].fix
        assert all(not c.ok and c.fix for c in _checks(report, "backends") if c.name.startswith("tensorrt"))
    # every ONNX Runtime provider eclipse-generate accepts is diagnosed
    backends = {c.name: c for c in _checks(report, "backends")}
    assert {f"onnxruntime-{p}" for p in ORT_PROVIDERS} <= set(backends)
    # every missing piece comes with its fix
    assert all(c.ok or c.fix for s in report.sections for c in s.checks)


def test_an_onnx_bundle_runs_here(tiny_bundle, capsys):
    assert main(["--bundle", str(tiny_bundle)]) == 0
    assert "the bundle can run here" in capsys.readouterr().out


def _engine_bundle(tiny_bundle_copy, cc="SM89", version="1.7.1.116"):
    manifest_path = tiny_bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["target"] = "trt-rtx-fp16"
    manifest["engines"] = {name: {"flavour": "tensorrt-rtx", "version": version, "compute_capabilities": [cc],
                                  "file": f"engines/{name}.rtx.plan", "key": name} for name in ("unet", "movq")}
    (tiny_bundle_copy / "engines").mkdir()
    for name in ("unet", "movq"):  # stand-in plans: the doctor reads the manifest, never the plan
        rel = f"engines/{name}.rtx.plan"
        (tiny_bundle_copy / rel).write_bytes(b"plan")
        manifest["files"][rel] = file_entry(tiny_bundle_copy, rel)
    manifest_path.write_text(json.dumps(manifest))
    return tiny_bundle_copy


def test_engines_for_another_gpu_get_the_rebuild_command(tiny_bundle_copy):
    pytest.importorskip("tensorrt_rtx")
    import tensorrt_rtx

    bundle = _engine_bundle(tiny_bundle_copy, version=tensorrt_rtx.__version__)
    ok = (Check("cuda-bindings", True, "cuda-bindings 13.5.0"), Check("nvrtc", True, "NVRTC 13.5"),
          Check("gpu", True, "RTX 3080 (SM86)"))
    probe = CudaProbe((13, 0), "13.5.0", (13, 5), (75, 86), (Gpu(0, "RTX 3080", "SM86", 10 << 30),), ok)
    report = diagnose(bundle, probe=probe)
    engines = {c.name: c for c in report.sections[-1].checks}
    assert report.bundle_runs is False
    assert "built for SM89, this GPU is SM86" in engines["unet"].found
    assert f"--from-bundle {bundle} --target trt-rtx-fp16 --compute-capability SM86" in engines["unet"].fix
    assert "fix: rebuild on this machine" in render(report)


def test_without_a_gpu_engines_cannot_run_and_the_exit_status_says_so(tiny_bundle_copy, capsys):
    if cuda_probe().gpus:
        pytest.skip("this machine has a GPU")
    assert main(["--bundle", str(_engine_bundle(tiny_bundle_copy))]) == 1
    out = capsys.readouterr().out
    assert "unet: tensorrt-rtx 1.7.1.116 engine for SM89: no GPU here to run it" in out
    assert "its ONNX graphs run here: eclipse-generate --backend onnxruntime" in out


def test_json_report_and_user_errors(tmp_path):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"  # the edge: no torch
            "from eclipse_export.cli.common import _run\nfrom eclipse_export.cli.doctor import main\n"
            "sys.exit(_run(main, sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [s["title"].split(" ")[0] for s in report["sections"]] == ["machine", "packages", "build", "backends"]
    done = subprocess.run([sys.executable, "-c", code, "--bundle", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: bundle ") and "Traceback" not in done.stderr
