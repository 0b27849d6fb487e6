"""Feed pre-drawn noises into diffusers' scheduler steps (reference and tests only; imports torch).

diffusers draws the variance noise inside `DDPMScheduler.step` / `UnCLIPScheduler.step` from a
torch generator. To compare the runtime with diffusers exactly, both must add the same noise:
these scoped patches make `step` take the next array from an iterator instead of drawing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch


@contextmanager
def _inject_variance_noise(noises: Iterator[np.ndarray], scheduler_module: str):
    def next_noise(shape, generator=None, device=None, dtype=None, layout=None):
        try:
            value = next(noises)
        except StopIteration:
            raise RuntimeError("diffusers asked for more variance noises than were injected") from None
        if tuple(value.shape) != tuple(shape):
            raise RuntimeError(f"injected noise has shape {value.shape}, diffusers wants {tuple(shape)}")
        return torch.from_numpy(np.ascontiguousarray(value)).to(device=device, dtype=dtype)

    with mock.patch(f"diffusers.schedulers.{scheduler_module}.randn_tensor", next_noise):
        yield


def inject_ddpm_variance_noise(noises: Iterator[np.ndarray]):
    return _inject_variance_noise(noises, "scheduling_ddpm")


def inject_unclip_variance_noise(noises: Iterator[np.ndarray]):
    return _inject_variance_noise(noises, "scheduling_unclip")
