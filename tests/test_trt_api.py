"""Every TensorRT attribute the builder (engines.py) and the runtime backend use exists: on the real
`tensorrt_rtx` module here, and for full TensorRT (not installable here) in NVIDIA's own Python
bindings of the versions users run, 10.3 (JetPack 6) and 11.1 (tests/data/tensorrt_python_api.json,
written by tools/tensorrt_api_list.py from github.com/NVIDIA/TensorRT python/src).

The uses are collected from the source (AST): attribute chains on the TensorRT module and on the
variables that hold TensorRT objects (listed per module below). A new TensorRT object variable
must be added to OBJECTS, or its uses go unchecked."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = json.loads((Path(__file__).parent / "data" / "tensorrt_python_api.json").read_text())

MODULE = "<module>"
# expression -> TensorRT class, per source file
OBJECTS = {
    "eclipse_export/export/engines.py": {
        "trt": MODULE, "builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser",
        "config": "IBuilderConfig", "profile": "IOptimizationProfile", "timing_cache": "ITimingCache",
    },
    "eclipse_export/runtime/backends/tensorrt.py": {
        "trt": MODULE, "self.trt": MODULE, "self.backend.trt": MODULE, "engine": "ICudaEngine",
        "config": "IRuntimeConfig", "self.runtime_cache": "IRuntimeCache", "self.context": "IExecutionContext",
        "refitter": "Refitter", "parser": "OnnxParserRefitter", "self.backend.runtime": "Runtime",
        "self.runtime": "Runtime",
    },
}
# Used only on the TensorRT-RTX path (the code checks the flavour or feature-detects first).
RTX_ONLY = {
    (MODULE, "ComputeCapability"), (MODULE, "CudaGraphStrategy"), ("IBuilderConfig", "num_compute_capabilities"),
    ("IBuilderConfig", "set_compute_capability"), ("ICudaEngine", "create_runtime_config"),
    ("IRuntimeConfig", "*"), ("IRuntimeCache", "*"), ("CudaGraphStrategy", "*"), ("ComputeCapability", "*"),
}
# Python's own members of every class/module
PYTHON_MEMBERS = {"__init__", "__name__", "__version__"}


def _chains(path: str) -> set[tuple[str, ...]]:
    """(class, attr, attr...) for every attribute chain rooted in a known TensorRT expression."""
    objects = OBJECTS[path]
    tree = ast.parse((ROOT / path).read_text())
    out = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attrs, base = [], node
        while isinstance(base, ast.Attribute):
            attrs.insert(0, base.attr)
            base = base.value
            if ast.unparse(base) in objects:
                out.add((objects[ast.unparse(base)], *attrs))
    # keep the longest chain per start (trt.A.B also yields trt.A)
    return {c for c in out if not any(o != c and o[:len(c)] == c for o in out)}


def _uses() -> set[tuple[str, ...]]:
    return set().union(*(_chains(p) for p in OBJECTS))


def _rtx_only(cls: str, attr: str) -> bool:
    return (cls, attr) in RTX_ONLY or (cls, "*") in RTX_ONLY


def test_the_collector_sees_the_calls_that_matter():
    uses = _uses()
    for expected in [("IExecutionContext", "execute_async_v3"), ("Builder", "build_serialized_network"),
                     ("IBuilderConfig", "set_memory_pool_limit"), (MODULE, "MemoryPoolType", "WORKSPACE"),
                     ("ICudaEngine", "get_tensor_mode"), ("OnnxParserRefitter", "refit_from_file"),
                     (MODULE, "NetworkDefinitionCreationFlag", "STRONGLY_TYPED")]:
        assert expected in uses, expected
    assert len(uses) > 35


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx is not installed")
def test_every_used_attribute_exists_on_tensorrt_rtx():
    import tensorrt_rtx as trt

    missing = []
    for chain in sorted(_uses()):
        obj = trt if chain[0] == MODULE else getattr(trt, chain[0], None)
        for attr in chain[1:]:
            obj = getattr(obj, attr, None)
        if obj is None:
            missing.append(".".join(chain))
    assert not missing, f"not on tensorrt_rtx {trt.__version__}: {missing}"


@pytest.mark.parametrize("version", sorted(API["versions"]))
def test_every_used_attribute_is_in_the_documented_tensorrt_api(version):
    members = API["versions"][version]["members"]
    classes = set(members["<module classes>"]) | set(members["<module functions>"])

    def has(cls: str, attr: str) -> bool:
        if attr in PYTHON_MEMBERS:
            return True
        if cls == MODULE:
            return attr in classes
        if attr in members["<module classes>"]:
            return True  # a nested type (ILogger.Severity)
        if cls in ("ILogger", "Logger") and attr in members["Severity"]:
            return True  # Logger.WARNING: the Severity values are exported onto the logger classes
        return attr in members.get(cls, ())

    missing = []
    for chain in sorted(_uses()):
        cls = chain[0]
        for attr in chain[1:]:
            if _rtx_only(cls, attr):
                break
            if not has(cls, attr):
                missing.append(".".join(chain))
                break
            cls = "Severity" if attr == "Severity" else attr  # trt.A.B: B is a member of class A
    assert not missing, f"not in TensorRT {version}'s Python API: {missing}"


def test_the_documented_list_covers_the_classes_it_claims():
    for version, data in API["versions"].items():
        members = data["members"]
        assert "execute_async_v3" in members["IExecutionContext"], version
        assert "STRONGLY_TYPED" in members["NetworkDefinitionCreationFlag"], version
        assert "refit_from_file" in members["OnnxParserRefitter"], version
