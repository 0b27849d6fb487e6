"""Classifier-free guidance on the decoder, as Kandinsky 2.2 does it.

The UNet runs on the batch [negative, positive]; guidance combines the two halves:
eps = u + s * (c - u). Guidance is on only for s > 1 (diffusers' rule); s <= 1 runs the
positive half alone, which is what s = 1 computes anyway at half the cost.
"""

from __future__ import annotations

import numpy as np


def cfg_enabled(scale: float) -> bool:
    return scale > 1.0


def cfg_batch(latents: np.ndarray) -> np.ndarray:
    return np.concatenate([latents, latents], axis=0)


def combine(noise_pred: np.ndarray, scale: float) -> np.ndarray:
    uncond, cond = np.split(noise_pred, 2, axis=0)
    # float32 scalar keeps the arithmetic in float32, like torch does
    return uncond + np.float32(scale) * (cond - uncond)
