"""Feed pre-drawn noises into diffusers' DDPM step (reference and tests only; imports torch).

diffusers draws the DDPM variance noise inside `DDPMScheduler.step` from a torch generator.
To compare the runtime with diffusers exactly, both must add the same noise: this scoped patch
makes `step` take the next array from an iterator instead of drawing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch


@contextmanager
def inject_ddpm_variance_noise(noises: Iterator[np.ndarray]):
    def next_noise(shape, generator=None, device=None, dtype=None, layout=None):
        try:
            value = next(noises)
        except StopIteration:
            raise RuntimeError("diffusers asked for more variance noises than were injected") from None
        if tuple(value.shape) != tuple(shape):
            raise RuntimeError(f"injected noise has shape {value.shape}, diffusers wants {tuple(shape)}")
        return torch.from_numpy(np.ascontiguousarray(value)).to(device=device, dtype=dtype)

    with mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", next_noise):
        yield
