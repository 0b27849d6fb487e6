"""TensorRT engines: TensorRT-RTX builds real engines here (CPU-only, ahead of time) from the
tiny preset's FP16 graphs; the full-TensorRT and GPU paths skip with a reason."""

from __future__ import annotations

import importlib.util
import json

import pytest

from eclipse_export.export.engines import (
    BuildOptions,
    build_engine,
    engine_key,
    profile_shapes,
)
from eclipse_export.families.kandinsky22.components import COMPONENTS
from eclipse_export.runtime.backends.trt_flavours import check_engine_compatible

needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")
TINY_DIMS = {"T": 77, "D": 32, "E": 32, "C": 4, "S": 8}
# tiny graphs, but the spec's real ranges (latents up to 128x128) need a roomy workspace
OPTIONS = dict(workspace_mib=8192, max_batch=1)


def test_profiles_follow_the_spec():
    shapes = profile_shapes(COMPONENTS["unet"], TINY_DIMS, BuildOptions(max_batch=3))
    lo, opt, hi = shapes["sample"]
    assert lo == (1, 4, 32, 32) and opt == (2, 4, 64, 64) and hi == (6, 4, 128, 128)
    assert shapes["timestep"] == ((1,), (1,), (1,))
    static = profile_shapes(COMPONENTS["movq"], TINY_DIMS, BuildOptions(static={"B": 1, "h": 64, "w": 48}))
    assert static["latents"] == ((1, 4, 64, 48),) * 3


class _Recorder:
    """A backend that runs the ONNX graphs and records every input shape the pipeline sends."""

    def __init__(self):
        from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend

        self.inner, self.name, self.seen = OnnxRuntimeBackend(), "recorder", []

    def load(self, spec, bundle):
        session, seen = self.inner.load(spec, bundle), self.seen

        class Recording:
            def run(self, inputs):
                seen.append((spec.name, {k: tuple(v.shape) for k, v in inputs.items()}))
                return session.run(inputs)

        return Recording()

    def describe(self):
        return {}


def _fits(shape, lo, hi) -> bool:
    return len(shape) == len(lo) and all(a <= d <= b for d, a, b in zip(shape, lo, hi))


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_every_request_within_max_batch_fits_the_profiles(tiny_bundle, static):
    """Issue 11 #4: what the pipeline really sends (batch 1..max_batch, with and without a negative
    prompt, guidance on and off) fits each component's profile, for dynamic and static builds."""
    from eclipse_export.runtime.bundle import open_bundle
    from eclipse_export.runtime.pipeline import Pipeline

    max_batch, px = 3, 256  # 256 px: the dynamic profiles' smallest latents (32x32)
    options = BuildOptions(max_batch=max_batch, static={"B": max_batch, "h": px // 8, "w": px // 8} if static else None)
    dims = open_bundle(tiny_bundle).dims
    profiles = {name: profile_shapes(spec, dims, options) for name, spec in COMPONENTS.items()}
    recorder = _Recorder()
    pipe = Pipeline.from_bundle(tiny_bundle, recorder)
    for batch in range(1, max_batch + 1):
        for negative in (None, "blurry"):
            for guidance in (4.0, 1.0):
                recorder.seen.clear()
                pipe.generate(["a cube"] * batch, negative_prompt=negative, height=px, width=px, steps=1,
                              guidance_scale=guidance)
                assert {name for name, _ in recorder.seen} == set(COMPONENTS)
                for name, inputs in recorder.seen:
                    for input_name, shape in inputs.items():
                        lo, _, hi = profiles[name][input_name]
                        assert _fits(shape, lo, hi), (name, input_name, shape, (lo, hi), batch, negative, guidance)


def test_engine_key_covers_what_makes_an_engine_valid():
    shapes = profile_shapes(COMPONENTS["prior"], TINY_DIMS, BuildOptions())
    base = engine_key("a" * 64, "fp16", shapes, BuildOptions(), "1.7")
    assert base != engine_key("b" * 64, "fp16", shapes, BuildOptions(), "1.7")  # ONNX changed
    assert base != engine_key("a" * 64, "fp16", shapes, BuildOptions(), "1.8")  # TensorRT version
    assert base != engine_key("a" * 64, "fp16", shapes, BuildOptions(compute_capabilities=("SM86",)), "1.7")
    assert base != engine_key("a" * 64, "fp16", shapes, BuildOptions(strip_weights=True), "1.7")
    assert base == engine_key("a" * 64, "fp16", shapes, BuildOptions(timing_cache=None), "1.7")


def test_incompatible_engines_are_named():
    entry = {"flavour": "tensorrt-rtx", "version": "1.7.1.116", "compute_capabilities": ["SM89"]}
    assert check_engine_compatible(entry, "1.7.1.116", "SM89") == []
    problems = check_engine_compatible(entry, "1.8.0", "SM86")
    assert "built with tensorrt-rtx 1.7.1.116, this machine has 1.8.0" in problems
    assert "built for SM89, this GPU is SM86" in problems
    assert check_engine_compatible(entry, None, None) == ["tensorrt_rtx is not installed"]


@needs_rtx
def test_trt_rtx_bundle_builds_all_four_engines(tmp_path):
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.sources import RandomSource
    from eclipse_export.runtime.bundle import open_bundle

    cache = tmp_path / "cache"
    options = ExportOptions(target="trt-rtx-fp16", build=BuildOptions(**OPTIONS), engine_cache=cache)
    out = export_bundle(RandomSource("tiny"), tmp_path / "b", options, log=lambda m: None)
    bundle = open_bundle(out)  # engines are in the manifest's verified files
    assert bundle.precision == "fp16" and set(bundle.manifest["engines"]) == set(COMPONENTS)
    for name, engine in bundle.manifest["engines"].items():
        assert engine["file"] in bundle.manifest["files"] and engine["bytes"] > 0
        assert engine["flavour"] == "tensorrt-rtx" and engine["compute_capabilities"] == ["SM89"]
        assert len(engine["key"]) == 64 and (cache / f"{engine['key']}.plan").is_file()
        assert engine["cached"] is False
        # the builder's weights total (what stripping would save) is part of the plan
        assert 0 < engine["weights_bytes"] < engine["bytes"]
    unet = bundle.manifest["engines"]["unet"]["profile"]["sample"]
    assert unet[0][0] == 1 and unet[2][0] == 2 and unet[0][2] == 32 and unet[2][2] == 128

    # same inputs again: every engine comes from the cache, bit for bit
    again = export_bundle(RandomSource("tiny"), tmp_path / "b2", options, log=lambda m: None)
    manifest = json.loads((again / "manifest.json").read_text())
    for name, engine in manifest["engines"].items():
        assert engine["cached"] is True and engine["key"] == bundle.manifest["engines"][name]["key"]
        assert (again / engine["file"]).read_bytes() == (out / engine["file"]).read_bytes()


@needs_rtx
def test_static_profile_engines(tiny_fp16_bundle, tmp_path):
    from eclipse_export.runtime.bundle import open_bundle

    bundle = open_bundle(tiny_fp16_bundle)
    for name, spec in COMPONENTS.items():
        sha = bundle.manifest["files"][bundle.component(name)["graph"]]["sha256"]
        entry = build_engine(bundle.graph_path(name), spec, bundle.dims, "fp16", sha,
                             BuildOptions(static={"B": 1, "h": 32, "w": 32}, **OPTIONS), tmp_path, log=lambda m: None)
        assert entry["static"] and (tmp_path / entry["file"]).stat().st_size > 0
        for t in spec.inputs:
            lo, opt, hi = entry["profile"][t.name]
            assert lo[1:] == opt[1:] == hi[1:]  # the image size is fixed, the batch covers 1..max_batch
            if t.shape[0] == "B":
                assert lo[0] == 1 and hi[0] == OPTIONS["max_batch"] * spec.rows_per_prompt


def test_trt_fp16_target_needs_tensorrt(tmp_path):
    """Full TensorRT cannot be installed here (PyPI has stubs): the target says so up front."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: this machine can build trt-fp16 engines")
    from eclipse_export.export.options import ExportError, ExportOptions
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.sources import RandomSource

    with pytest.raises(ExportError, match="tensorrt is not installed"):
        export_bundle(RandomSource("tiny"), tmp_path / "b", ExportOptions(target="trt-fp16"), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@needs_rtx
def test_engines_from_a_shipped_fp16_bundle(tiny_fp16_bundle, tiny_bundle, tmp_path):
    """--from-bundle: the device workflow (engines from the ONNX a workstation exported)."""
    from eclipse_export.export.options import ExportError
    from eclipse_export.export.derive import build_engines_for_bundle
    from eclipse_export.runtime.bundle import open_bundle

    out = build_engines_for_bundle(tiny_fp16_bundle, tmp_path / "trt", "trt-rtx-fp16", BuildOptions(**OPTIONS),
                                   log=lambda m: None)
    bundle = open_bundle(out)
    assert bundle.manifest["target"] == "trt-rtx-fp16" and set(bundle.manifest["engines"]) == set(COMPONENTS)
    assert all(e["peak_rss_bytes"] > 0 for e in bundle.manifest["engines"].values())
    with pytest.raises(ExportError, match="holds fp32 graphs; trt-rtx-fp16 needs fp16"):
        build_engines_for_bundle(tiny_bundle, tmp_path / "x", "trt-rtx-fp16", BuildOptions(**OPTIONS), log=lambda m: None)
    assert not (tmp_path / "x").exists()


@needs_rtx
def test_weight_stripped_rtx_builds_are_refused_up_front_without_a_gpu(tiny_fp16_bundle, tmp_path):
    """NVIDIA documents a GPU at build time for STRIP_PLAN + REFIT (seen here: every refittable
    build fails in Myelin without one); the refusal comes before any work, nothing is written."""
    from eclipse_export.export.engines import build_gpu_compute_capability
    from eclipse_export.export.options import ExportError
    from eclipse_export.export.derive import build_engines_for_bundle

    two = BuildOptions(strip_weights=True, compute_capabilities=("SM86", "SM89"), **OPTIONS)
    with pytest.raises(ExportError, match="exactly one compute capability"):
        build_engines_for_bundle(tiny_fp16_bundle, tmp_path / "a", "trt-rtx-fp16", two, log=lambda m: None)
    if build_gpu_compute_capability() != "unknown":
        pytest.skip("a GPU is present: weight-stripped TensorRT-RTX builds are allowed here")
    one = BuildOptions(strip_weights=True, **OPTIONS)
    with pytest.raises(ExportError, match="need a GPU at build time"):
        build_engines_for_bundle(tiny_fp16_bundle, tmp_path / "b", "trt-rtx-fp16", one, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@needs_rtx
def test_a_build_prints_its_phases_and_a_line_at_least_every_interval(tiny_fp16_bundle, tmp_path):
    """Issue 11 #3 (TensorRT calls phase_start(phase_name, parent_phase, num_steps): the phases
    never printed) and issue 12 (a line at least every 10 s; here every 0.25 s, from the timer
    thread while TensorRT sits in one phase)."""
    import time

    from eclipse_export.runtime.bundle import open_bundle

    bundle = open_bundle(tiny_fp16_bundle)
    lines = []
    t0 = time.monotonic()
    build_engine(bundle.graph_path("unet"), COMPONENTS["unet"], bundle.dims, "fp16", "sha", BuildOptions(**OPTIONS),
                 tmp_path, log=lambda m: lines.append((time.monotonic() - t0, m)), progress_interval=0.25)
    text = [m for _, m in lines]
    assert "    unet: Building engine" in text  # the top-level phase, from the progress monitor
    assert any("still at:" in m and "[unet: " in m for m in text)
    stamps = [t for t, _ in lines]
    assert max(b - a for a, b in zip(stamps, stamps[1:])) <= 0.25 + 0.1  # scheduling slack only


@needs_rtx
def test_out_of_memory_names_the_options_that_fix_it(tiny_fp16_bundle, tmp_path):
    """Issue 12 #1: TensorRT-RTX refuses an engine whose largest shape needs more builder scratch
    than the workspace cap (tiny UNet: ~1 GiB per UNet batch row at 1024 px) and prints the cap as
    the "requested size"; the error says which options fix it."""
    from eclipse_export.export.engines import EngineBuildError
    from eclipse_export.runtime.bundle import open_bundle

    bundle = open_bundle(tiny_fp16_bundle)
    with pytest.raises(EngineBuildError, match=r"sample \[4, 4, 128, 128\].*--workspace-mib 1024.*--max-batch \(now 2\)"):
        build_engine(bundle.graph_path("unet"), COMPONENTS["unet"], bundle.dims, "fp16", "sha",
                     BuildOptions(max_batch=2, workspace_mib=1024), tmp_path, log=lambda m: None)
    assert not list((tmp_path / "engines").glob("*"))


def _leftovers(parent):
    """What a failed build may not leave: partial bundles, temporary files."""
    return sorted(p.name for p in parent.rglob("*") if ".partial-" in p.name or p.name.startswith(".") and ".plan." in p.name)


@needs_rtx
@pytest.mark.parametrize("failure,where", [(RuntimeError("injected"), "export"), (KeyboardInterrupt(), "derive")],
                         ids=["error-in-export", "interrupt-in-from-bundle"])
def test_a_failed_engine_build_leaves_nothing(tiny_fp16_bundle, tmp_path, monkeypatch, failure, where):
    """Issue 12 "Also": an engine build that fails or is interrupted after some engines were
    written (export, and --from-bundle derivation) leaves no bundle and no partial files; the
    engine cache keeps only complete plans."""
    from eclipse_export.export import engines
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.derive import build_engines_for_bundle
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.sources import RandomSource

    real = engines.build_engine

    def failing(onnx_path, spec, *args, **kwargs):
        if spec.name == "unet":
            raise failure
        return real(onnx_path, spec, *args, **kwargs)

    monkeypatch.setattr(engines, "build_engine", failing)
    cache = tmp_path / "cache"
    build = BuildOptions(**OPTIONS)
    with pytest.raises(type(failure)):
        if where == "derive":
            build_engines_for_bundle(tiny_fp16_bundle, tmp_path / "out", "trt-rtx-fp16", build, cache, log=lambda m: None)
        else:
            export_bundle(RandomSource("tiny"), tmp_path / "out",
                          ExportOptions(target="trt-rtx-fp16", build=build, engine_cache=cache), log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert _leftovers(tmp_path) == []
    # the engines built before the failure stay in the cache: complete plans, reusable
    assert {p.suffix for p in cache.iterdir()} == {".plan"}


@needs_rtx
def test_ctrl_c_during_a_tensorrt_build_leaves_nothing(tiny_fp16_bundle, tmp_path):
    """A real SIGINT while TensorRT builds the UNet: it lands in a progress-monitor callback, which
    cancels the build instead of unwinding through TensorRT; then the derivation is removed."""
    import signal
    import threading
    import time

    from eclipse_export.export.derive import build_engines_for_bundle

    started = []

    def log(msg):
        if "unet: building" in msg and not started:
            started.append(time.monotonic())
            threading.Timer(0.3, signal.raise_signal, (signal.SIGINT,)).start()

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        build_engines_for_bundle(tiny_fp16_bundle, tmp_path / "derived", "trt-rtx-fp16", BuildOptions(**OPTIONS),
                                 tmp_path / "cache", log=log)
    assert started and time.monotonic() - t0 < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"] and _leftovers(tmp_path) == []


@needs_rtx
@pytest.mark.slow
def test_the_readme_default_trt_rtx_command_builds(tmp_path):
    """Issue 12 #1: exactly the README's `eclipse-export --preset tiny --target trt-rtx-fp16 --out
    DIR`, every other option at its default (it failed with OutOfMemory at max batch 4)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("eclipse-export")
    command = [str(script)] if script.is_file() else [sys.executable, "-c",
                                                      "from eclipse_export.cli.export import export_entry; export_entry()"]
    done = subprocess.run(command + ["--preset", "tiny", "--target", "trt-rtx-fp16", "--out", "DIR"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "DIR" / "manifest.json").read_text())
    assert set(manifest["engines"]) == set(COMPONENTS)
    assert manifest["engines"]["unet"]["profile"]["sample"][2][0] == 2  # one prompt, CFG
    assert "unet: Building engine" in done.stderr
