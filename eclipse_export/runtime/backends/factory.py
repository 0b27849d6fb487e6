"""Backend by name: the one place that knows every backend (the backends themselves import only
`base`). The TensorRT backend is imported only when asked for (it needs cuda-python)."""

from __future__ import annotations

from collections.abc import Sequence

from eclipse_export.runtime.backends.base import Backend, BackendError
from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend

BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")


def make_backend(name: str = "onnxruntime", providers: Sequence[str] = ("cpu",), threads: int | None = None,
                 low_memory: bool = False, cuda_graphs: bool = True, runtime_cache_dir=None,
                 device_loop: bool | None = None, cpu_profile: str = "tuned") -> Backend:
    if name == "onnxruntime":
        return OnnxRuntimeBackend(providers, threads, cuda_graphs=cuda_graphs, device_loop=device_loop,
                                  cpu_profile=cpu_profile)
    if name in ("tensorrt", "tensorrt-rtx"):
        from eclipse_export.runtime.backends.tensorrt import (
            TensorRTBackend,  # imports cuda-python only when asked for
        )

        return TensorRTBackend(name, low_memory=low_memory, cuda_graphs=cuda_graphs,
                               runtime_cache_dir=runtime_cache_dir)
    raise BackendError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})")


def backend_for_bundle(manifest: dict) -> str:
    """The backend a bundle's target runs on by default."""
    engines = manifest.get("engines") or {}
    flavours = {e["flavour"] for e in engines.values()}
    return flavours.pop() if len(flavours) == 1 else "onnxruntime"
