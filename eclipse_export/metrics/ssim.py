"""SSIM (Wang et al. 2004) of 8-bit images in numpy, matching scikit-image's
`structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=255, channel_axis=-1)` (tested against it). Small and dependency-free so that a
device benchmark needs neither scipy nor scikit-image."""

from __future__ import annotations

import numpy as np

_SIGMA, _RADIUS = 1.5, 5  # scikit-image: truncate 3.5 -> radius int(3.5 * 1.5 + 0.5) = 5
_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def _kernel() -> np.ndarray:
    x = np.arange(-_RADIUS, _RADIUS + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / _SIGMA) ** 2)
    return k / k.sum()


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable Gaussian over the first two axes, scipy's 'reflect' (= numpy 'symmetric') edges."""
    k = _kernel()
    pad = np.pad(img, ((_RADIUS, _RADIUS), (_RADIUS, _RADIUS), (0, 0)), mode="symmetric")
    rows = sum(k[i] * pad[i : i + img.shape[0]] for i in range(k.size))
    return sum(k[i] * rows[:, i : i + img.shape[1]] for i in range(k.size))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over a batch of (B,H,W,3) or one (H,W,3) uint8 image."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 4:
        return float(np.mean([ssim(x, y) for x, y in zip(a, b)]))
    x, y = a.astype(np.float64), b.astype(np.float64)
    mx, my = _blur(x), _blur(y)
    vx, vy, cxy = _blur(x * x) - mx * mx, _blur(y * y) - my * my, _blur(x * y) - mx * my
    s = ((2 * mx * my + _C1) * (2 * cxy + _C2)) / ((mx * mx + my * my + _C1) * (vx + vy + _C2))
    r = _RADIUS
    return float(s[r:-r, r:-r].mean())
