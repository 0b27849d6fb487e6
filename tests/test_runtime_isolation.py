"""The edge runtime (eclipse_export/runtime/) never imports torch or export-side code (issue 11
#10): every runtime module is imported in a fresh interpreter where torch, diffusers,
transformers and every eclipse_export module outside runtime/ fail to import. Importing is what
counts (a static scan misses imports inside functions), so each module's import-time and
lazily imported dependencies are exercised: the backend factory and the TensorRT backend's
module are imported too."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import eclipse_export
import eclipse_export.runtime

# torch-free model-family data (component specs, chains, preset configs) is shared by export and
# runtime by design (see families/__init__.py); everything else outside runtime/ is refused
SHARED_PREFIXES = ("eclipse_export.families",)

SCRIPT = r"""
import importlib, importlib.abc, json, sys
blocked_roots = ("torch", "torchvision", "diffusers", "transformers", "open_clip", "onnx", "onnxscript", "accelerate",
                 "onnxconverter_common", "safetensors")
allowed = tuple(json.loads(sys.argv[2]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        export_side = name.startswith("eclipse_export.") and not name.startswith("eclipse_export.runtime") and not name.startswith(allowed)
        if name.split(".")[0] in blocked_roots or export_side:
            raise ImportError(f"blocked for the edge runtime: {name}")
        return None

sys.meta_path.insert(0, Block())
failed = {}
for module in json.loads(sys.argv[1]):
    try:
        importlib.import_module(module)
    except ImportError as e:
        failed[module] = str(e)
print(json.dumps(failed))
"""


def _runtime_modules() -> list[str]:
    path = Path(eclipse_export.runtime.__file__).parent
    return ["eclipse_export.runtime"] + [m.name for m in pkgutil.walk_packages([str(path)], "eclipse_export.runtime.")]


def test_no_runtime_module_imports_torch_or_export_code():
    modules = _runtime_modules()
    assert {"eclipse_export.runtime.backends.tensorrt", "eclipse_export.runtime.backends.cuda",
            "eclipse_export.runtime.backends.gpu_probe", "eclipse_export.runtime.backends.factory"} <= set(modules)
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(modules), json.dumps(list(SHARED_PREFIXES))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert failed == {}, failed


def test_the_blocker_catches_an_export_import():
    """The check itself can fail: the builder (export side) is refused under it."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(["eclipse_export.export.engines"]), "[]"],
                          capture_output=True, text=True, timeout=120)
    assert "eclipse_export.export.engines" in json.loads(done.stdout.strip().splitlines()[-1])
