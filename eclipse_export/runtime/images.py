"""Float images in [0,1] -> 8-bit arrays -> PNG files, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B,H,W,3) float in [0,1] -> uint8, rounding like diffusers' numpy_to_pil."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write one (H,W,3) uint8 image. The file appears whole or not at all."""
    from PIL import Image

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; an image gets the ordinary mode (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            # no timestamps or other metadata: the same pixels give the same bytes
            Image.fromarray(np.ascontiguousarray(image)).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
