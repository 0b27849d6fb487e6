"""A loaded bundle serving batches of independent requests (one per model instance or replica).

Requests that agree on everything but prompt and seed (size, steps, guidance, negative prompt)
run as one batched pipeline call; each row keeps its own seed's noises, so a request's image
does not depend on which requests shared its batch beyond the backend's batched arithmetic
(alone, it is exactly what `Pipeline.generate` gives for the same seed).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eclipse_export.runtime.backends.base import Backend
from eclipse_export.runtime.backends.factory import backend_for_bundle, make_backend
from eclipse_export.runtime.bundle import open_bundle
from eclipse_export.runtime.noise import Noises
from eclipse_export.runtime.pipeline import GenerationError, Pipeline, Request
from eclipse_export.serve.limits import Item, RequestError, ServeLimits, limits_for_bundle


def backend_for(manifest: dict, device: str = "cpu", device_id: int = 0, threads: int | None = None) -> Backend:
    """The backend the bundle calls for, on the instance's device (Triton's instance kind)."""
    name = backend_for_bundle(manifest)
    if name == "onnxruntime":
        from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend

        providers = ("cuda", "cpu") if device == "gpu" else ("cpu",)
        return OnnxRuntimeBackend(providers, threads, device_id=device_id)
    # TensorRT engines run on the process's current CUDA device (CUDA_VISIBLE_DEVICES per server)
    return make_backend(name)


def batch_noises(pipe: Pipeline, items: Sequence[Item]) -> Noises:
    """The batch's noises: each row's own seed, in the order Pipeline.run consumes them (prior
    rows: every prompt, then every negative prompt)."""
    single = [pipe.noises_for(Request.make(it.prompt, it.negative_prompt, it.height, it.width, it.steps,
                                           it.guidance, it.seed)[0]) for it in items]
    negative = items[0].negative_prompt is not None
    prior = [n.prior[:1] for n in single] + ([n.prior[1:] for n in single] if negative else [])
    steps = None if single[0].steps is None else np.concatenate([n.steps for n in single], axis=1)
    return Noises(np.concatenate(prior), np.concatenate([n.latents for n in single]), steps)


class Generator:
    """One bundle, loaded once; `generate` is safe to call from one thread at a time (a lock
    holds others back: one pipeline's backend sessions are not shared between concurrent runs)."""

    def __init__(self, bundle: str | Path, limits: ServeLimits, device: str = "cpu", device_id: int = 0,
                 threads: int | None = None, backend: Backend | None = None):
        opened = open_bundle(bundle)  # every file's hash checked once, at load
        self.limits = limits_for_bundle(opened.manifest, limits)
        # backend: another way to run the graphs (the stages layout's BLS model calls other models)
        self.pipeline = Pipeline(opened, backend or backend_for(opened.manifest, device, device_id, threads))
        self._lock = threading.Lock()

    def close(self) -> None:
        self.pipeline.close()

    def generate(self, items: Sequence[Item]) -> list[np.ndarray | Exception]:
        """One (H,W,3) uint8 image per item, or the exception that item's group raised."""
        results: list[np.ndarray | Exception | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.group_key(), []).append(i)
        with self._lock:
            for rows in groups.values():
                for start in range(0, len(rows), self.limits.max_batch):
                    chunk = rows[start:start + self.limits.max_batch]
                    batch = [items[i] for i in chunk]
                    try:
                        images = self._run(batch)
                    except Exception as e:  # noqa: BLE001 - reported to the requests of this chunk only
                        for i in chunk:
                            results[i] = e
                        continue
                    for i, image in zip(chunk, images):
                        results[i] = image
        return results  # type: ignore[return-value]

    def _run(self, batch: Sequence[Item]) -> np.ndarray:
        first = batch[0]
        try:
            req, _ = Request.make([it.prompt for it in batch], first.negative_prompt, first.height, first.width,
                                  first.steps, first.guidance, 0)
        except GenerationError as e:
            raise RequestError(str(e)) from None
        return self.pipeline.run(req, noises=batch_noises(self.pipeline, batch)).images
