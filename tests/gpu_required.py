"""Skip or fail a test that needs the GPU, by where it runs.

In CI (no GPU) a GPU test skips with its reason. On the GPU verification machine
(bench/gpu/gpu_verify.py sets ECLIPSE_GPU_REQUIRED=cuda,ort-cuda) the same missing piece is a
failure: an ONNX Runtime CUDA provider that does not load, or cuda-bindings that see no GPU,
must not pass as a quiet skip there (issue 18 #1).
"""

from __future__ import annotations

import os

import pytest

KINDS = ("cuda", "ort-cuda")


def required() -> set[str]:
    return {k.strip() for k in os.environ.get("ECLIPSE_GPU_REQUIRED", "").split(",") if k.strip()}


def need(kind: str, reason: str | None) -> None:
    """Call first in a GPU test: returns where the test can run, else skips (or fails where
    `kind` is required) with the reason."""
    assert kind in KINDS, kind
    if reason is None:
        return
    if kind in required():
        pytest.fail(f"required on this machine ({kind}) but: {reason}", pytrace=False)
    pytest.skip(reason)
