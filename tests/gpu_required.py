"""Skip or fail a test that needs the GPU, by where it runs.

In CI (no GPU) a GPU test skips with its reason. On the GPU verification machine
(bench/gpu/gpu_verify.py sets ECLIPSE_GPU_REQUIRED=cuda,ort-cuda) the same missing piece is a
failure: an ONNX Runtime CUDA provider that does not load, or cuda-bindings that see no GPU,
must not pass as a quiet skip there (issue 18 #1).
"""

from __future__ import annotations

import functools
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


@functools.cache
def cuda_reason() -> str | None:
    """None where cuda-bindings reach a GPU here, else why not (the GPU window requires it)."""
    from eclipse_export.runtime.backends.base import BackendError
    from eclipse_export.runtime.backends.cuda import Cuda

    try:
        Cuda(0).close()
    except BackendError as e:
        return str(e)
    return None
