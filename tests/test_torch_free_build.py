"""Issue 22 #1: on a device (the edge runtime + onnx + TensorRT, no torch) `eclipse-export
--from-bundle` builds engines and INT8 graphs from a shipped bundle. The CLI runs here in a fresh
interpreter where torch, transformers, diffusers and the other model libraries fail to import
(a meta-path blocker, as in test_runtime_isolation.py), and builds a real TensorRT-RTX engine
bundle (TensorRT-RTX builds ahead of time without a GPU). What truly needs torch, or the onnx
package, is one `error:` line naming the extra to install."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")

TORCH_SIDE = ["torch", "torchvision", "torchaudio", "diffusers", "transformers", "open_clip", "safetensors",
              "accelerate", "onnxscript", "onnxconverter_common", "huggingface_hub"]

SCRIPT = r"""
import importlib.abc, json, runpy, sys
blocked = tuple(json.loads(sys.argv[1]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"blocked (not on this device): {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
module = sys.argv[3] if len(sys.argv) > 3 else "eclipse_export.cli.export"
sys.argv = ["eclipse-tool"] + json.loads(sys.argv[2])
runpy.run_module(module, run_name="__main__")
"""

BUILD = ["--workspace-mib", "8192"]  # the spec's full latent range on the tiny graphs (see test_engines)


def export_without_torch(argv: list[str], also_blocked: tuple[str, ...] = (),
                         module: str = "eclipse_export.cli.export") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(TORCH_SIDE + list(also_blocked)),
                           json.dumps([str(a) for a in argv]), module], capture_output=True, text=True, timeout=600)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_the_blocker_really_blocks_torch():
    """The check can fail: under the blocker, exporting from a preset (PyTorch) is refused."""
    done = export_without_torch(["--preset", "tiny", "--out", "/nonexistent/x"])
    line = one_error_line(done)
    assert "needs PyTorch" in line and "[export]" in line and "--from-bundle" in line


@needs_rtx
def test_rtx_engines_from_a_shipped_bundle_without_torch(tiny_fp16_bundle, tmp_path):
    from eclipse_export.runtime.bundle import open_bundle

    out = tmp_path / "engines" / "tiny-trt-rtx-fp16"
    done = export_without_torch(["--from-bundle", tiny_fp16_bundle, "--target", "trt-rtx-fp16", "--out", out, *BUILD])
    assert done.returncode == 0, done.stderr
    bundle = open_bundle(out)  # every file verified against the manifest
    assert bundle.manifest["target"] == "trt-rtx-fp16"
    assert {e["flavour"] for e in bundle.manifest["engines"].values()} == {"tensorrt-rtx"}
    assert set(bundle.manifest["engines"]) == set(bundle.manifest["components"])
    # issue 22 #2: from Python, an engine bundle runs on the backend it calls for, never silently
    # on its ONNX graphs on ONNX Runtime's CPU provider (no GPU here: the TensorRT-RTX backend says so)
    from eclipse_export.runtime.backends.base import BackendError
    from eclipse_export.runtime.pipeline import Pipeline

    with pytest.raises(BackendError, match="tensorrt-rtx backend"):
        Pipeline.from_bundle(out)


def test_int8_graphs_from_a_shipped_bundle_without_torch(tiny_bundle, tmp_path):
    """onnx-int8's calibration runs the chain on ONNX Runtime: no torch either."""
    from eclipse_export.runtime.bundle import open_bundle

    out = tmp_path / "tiny-onnx-int8"
    done = export_without_torch(["--from-bundle", tiny_bundle, "--target", "onnx-int8", "--out", out,
                                 "--calibration-count", "6", "--validation-count", "2",
                                 "--calibration-size", "64x64", "--calibration-steps", "4",
                                 "--calibration-cache", tmp_path / "cal"])
    assert done.returncode == 0, done.stderr
    assert open_bundle(out).component("unet")["precision"] == "int8"


@pytest.mark.parametrize("target", ["trt-fp16", "trt-int8"])
def test_full_tensorrt_targets_say_what_is_missing(tiny_bundle, tiny_fp16_bundle, tmp_path, target):
    """Full TensorRT is not installable here: the one-line refusal is about TensorRT, not torch."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    src = tiny_fp16_bundle if target == "trt-fp16" else tiny_bundle
    done = export_without_torch(["--from-bundle", src, "--target", target, "--out", tmp_path / "x"])
    line = one_error_line(done)
    assert "tensorrt is not installed" in line and "torch" not in line
    assert list(tmp_path.iterdir()) == []


def test_a_missing_onnx_package_names_the_edge_build_extra(tiny_fp16_bundle, tmp_path):
    done = export_without_torch(["--from-bundle", tiny_fp16_bundle, "--target", "trt-rtx-fp16",
                                 "--out", tmp_path / "x"], also_blocked=("onnx",))
    line = one_error_line(done)
    assert "needs the onnx package" in line and "eclipse-export[edge-build]" in line
    assert list(tmp_path.iterdir()) == []


def test_the_edge_build_extra_is_declared():
    """The extra the errors name exists and holds onnx but no torch-side package."""
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {dep.split(">")[0].split("=")[0].split("[")[0].strip() for dep in extras["edge-build"]}
    assert "onnx" in names and not names & set(TORCH_SIDE)


def test_bench_runs_on_the_edge_runtime_alone(tiny_bundle, tmp_path):
    """eclipse-bench on a device: neither torch nor onnx. It says there is no reference (parity
    n/a) and no FLOP count, and times the targets."""
    done = export_without_torch(["--bundle", tiny_bundle, "--out", tmp_path / "r", "--height", "64", "--width", "64",
                                 "--steps", "1", "--runs", "1", "--warmup", "0", "--batch", "1", "--targets", "onnx@cpu"],
                                also_blocked=("onnx",), module="eclipse_export.cli.bench")
    assert done.returncode == 0, done.stderr
    assert "torch is not installed" in done.stderr and "FLOPs not counted" in done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("onnx@cpu/b1"))
    assert row.split()[-2:] == ["n/a", "n/a"]
