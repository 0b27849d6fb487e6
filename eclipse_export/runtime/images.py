"""Float images in [0,1] -> 8-bit arrays -> PNG files, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B,H,W,3) float in [0,1] -> uint8, rounding like diffusers' numpy_to_pil."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


# The PNG text chunk holding the request (JSON), so an image can be reproduced from its file:
# `eclipse-generate --from-png image.png` reads it back (read_png_request).
REQUEST_KEY = "eclipse-export:request"


def save_png(image: np.ndarray, path: str | Path, request: dict | None = None) -> Path:
    """Write one (H,W,3) uint8 image. The file appears whole or not at all. `request` (what made
    the image: prompt, seed, size, steps, ...) goes into an iTXt chunk as JSON, plus the prompt
    as the standard `Description` and the producer as `Software`."""
    from PIL import Image, PngImagePlugin

    info = None
    if request is not None:
        info = PngImagePlugin.PngInfo()
        # iTXt: UTF-8 (a tEXt chunk is Latin-1 only and would mangle non-Latin prompts)
        info.add_itxt(REQUEST_KEY, json.dumps(request, sort_keys=True, ensure_ascii=False))
        if isinstance(request.get("prompt"), str):
            info.add_itxt("Description", request["prompt"])
        info.add_text("Software", f"eclipse-export {request.get('version', '')}".strip())
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; an image gets the ordinary mode (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            # no timestamps: the same pixels and request give the same bytes
            Image.fromarray(np.ascontiguousarray(image)).save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_png_request(path: str | Path) -> dict | None:
    """The request save_png stored in a PNG, or None when the file has none. Raises OSError /
    ValueError for a file that is not a readable PNG or holds malformed JSON."""
    from PIL import Image

    with Image.open(path) as im:
        if im.format != "PNG":
            raise ValueError(f"{path} is not a PNG file")
        text = getattr(im, "text", {}).get(REQUEST_KEY)
    if text is None:
        return None
    request = json.loads(text)
    if not isinstance(request, dict):
        raise ValueError(f"{path}: the {REQUEST_KEY} chunk is not a JSON object")
    return request
