"""Antialiased bicubic resize, as torch's `F.interpolate(x, size, mode="bicubic",
align_corners=False, antialias=True)` computes it (diffusers' unCLIP pipeline upsamples the 64 px
decoder image to the super-resolution size with it). Numpy, torch-free; tested against torch.

torch's antialiased path (Pillow's resampling scheme) is separable: each output pixel i of an
axis is a normalised weighted sum of the input pixels within `support` of its centre
    scale  = in / out                        centre = scale * (i + 0.5)
    support = 2 * max(scale, 1)              invscale = 1 / max(scale, 1)
    taps   j = xmin .. xmax - 1, xmin = max(trunc(centre - support + 0.5), 0),
                                 xmax = min(trunc(centre + support + 0.5), in)
    weight = cubic((j - centre + 0.5) * invscale) / sum of the taps' weights
with Keys' cubic for a = -0.5 (not the -0.75 of the non-antialiased bicubic). Taps beyond the
border are dropped and the rest renormalised (no edge replication). Sums are in float64 and
rounded to float32 once: within 1e-6 of torch's float32 result.
"""

from __future__ import annotations

import numpy as np

_A = -0.5


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of one axis' antialiased bicubic weights."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = _cubic((taps - centre + 0.5) * invscale)
        total = w.sum()
        weights[i, lo:hi] = w / total if total != 0 else w
    return weights


def resize_bicubic_aa(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, C, H, W) float -> (B, C, height, width) float32."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) array, got shape {x.shape}")
    wh = aa_weights(x.shape[2], height)
    ww = aa_weights(x.shape[3], width)
    out = np.einsum("oh,bchw,pw->bcop", wh, x.astype(np.float64), ww, optimize=True)
    return out.astype(np.float32)
