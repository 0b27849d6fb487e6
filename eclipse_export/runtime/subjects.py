"""Subject and control images of λ-ECLIPSE on the edge (numpy + Pillow; OpenCV only for Canny).

- `load_image`: a file, a PIL image or an RGB8 array -> (H,W,3) uint8 RGB. EXIF orientation is
  applied; transparency is composited on white (λ-ECLIPSE's subjects are cut out on white);
  greyscale and palette images become RGB.
- `preprocess`: CLIPImageProcessor's exact steps from the bundle's preprocessor_config.json:
  shortest edge -> `size` with PIL bicubic (the long edge truncated as transformers computes it),
  centre crop, x rescale_factor (float64, then float32), (x - mean) / std. Tested against
  transformers' CLIPImageProcessor (tests/test_subjects.py; the measured difference is in the
  README).
- `canny`: the official edge map (grey, cv2.Canny 100/200, back to three channels).
- `keyword_ids` / `interleave`: the official interleaving: every prompt position whose id equals
  ANY sub-token of the keyword (tokenized alone, without bos/eos) gets the subject's image
  embedding in place of its text state; later subjects overwrite earlier ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np



class SubjectError(ValueError):
    """A subject or control image (or keyword) cannot be used; one line for the user. The
    request turns it into a GenerationError."""


# official λ-ECLIPSE edge maps (cv2.Canny thresholds)
CANNY_LOW, CANNY_HIGH = 100, 200
# Pillow's default decompression-bomb limit is ~89 Mpixel; a subject image never needs more
MAX_PIXELS = 64 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class SubjectImage:
    """A decoded image (RGB8) and where it came from (for messages)."""

    pixels: np.ndarray  # (H, W, 3) uint8
    origin: str


def _from_pil(image) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        image = ImageOps.exif_transpose(image)  # a phone photo's orientation tag
    except Exception:  # noqa: BLE001 - a malformed EXIF block: keep the stored orientation
        pass
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float greyscale: Pillow's convert("RGB") clips instead of scaling; scale to 8 bits
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") and arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_image(source, what: str = "subject image") -> SubjectImage:
    """Decode `source` (path, PIL image, or (H,W,3)/(H,W) uint8 array) to RGB8. Every problem is
    one SubjectError naming the image."""
    if isinstance(source, SubjectImage):
        return source
    if isinstance(source, np.ndarray):
        arr = source
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise SubjectError(f"{what}: an array must be uint8 (H,W), (H,W,3) or (H,W,4), got "
                                  f"{arr.dtype} {arr.shape}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise SubjectError(f"{what}: the image is empty ({arr.shape[1]}x{arr.shape[0]})")
        from PIL import Image

        return SubjectImage(_from_pil(Image.fromarray(np.ascontiguousarray(arr))), "array")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:  # pragma: no cover - Pillow is a runtime dependency
        raise SubjectError(f"{what}: Pillow is needed to read images ({e})") from None
    if isinstance(source, Image.Image):
        if source.width == 0 or source.height == 0:
            raise SubjectError(f"{what}: the image is empty ({source.width}x{source.height})")
        return SubjectImage(_from_pil(source), "image")
    if not isinstance(source, (str, Path)):
        raise SubjectError(f"{what}: expected a file path, a PIL image or a uint8 array, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise SubjectError(f"{what} {path}: no such file" if not path.exists() else f"{what} {path}: not a file")
    if path.stat().st_size == 0:
        raise SubjectError(f"{what} {path}: the file is empty")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise SubjectError(f"{what} {path}: {image.width}x{image.height} is larger than this runtime "
                                      f"reads ({MAX_PIXELS} pixels)")
            if image.width == 0 or image.height == 0:
                raise SubjectError(f"{what} {path}: the image is empty")
            image.load()
            pixels = _from_pil(image)
    except SubjectError:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit (2x its warning size) fired first
        raise SubjectError(f"{what} {path}: larger than this runtime reads ({MAX_PIXELS} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SubjectError(f"{what} {path}: not a readable image ({type(e).__name__}: {e})") from None
    return SubjectImage(pixels, str(path))


# --- CLIPImageProcessor -----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageProcessorConfig:
    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    resample: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_json(cls, config: Mapping) -> "ImageProcessorConfig":
        """transformers' preprocessor_config.json of a CLIPImageProcessor. Only the steps CLIP
        uses are implemented: refuse a config that switches one off or asks for another."""
        try:
            size = config.get("size", {"shortest_edge": 224})
            edge = size["shortest_edge"] if isinstance(size, Mapping) else int(size)
            crop = config.get("crop_size", {"height": 224, "width": 224})
            crop = (crop["height"], crop["width"]) if isinstance(crop, Mapping) else (int(crop), int(crop))
            flags = [config.get(k, True) for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize")]
            if not all(flags):
                raise ValueError("do_resize/do_center_crop/do_rescale/do_normalize must all be true")
            out = cls(int(edge), (int(crop[0]), int(crop[1])), int(config.get("resample", 3)),
                      float(config.get("rescale_factor", 1 / 255)),
                      tuple(float(x) for x in config["image_mean"]), tuple(float(x) for x in config["image_std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a CLIPImageProcessor config this runtime follows ({e})") from None
        if len(out.mean) != 3 or len(out.std) != 3 or min(out.std) <= 0 or out.shortest_edge < 1 or min(out.crop) < 1:
            raise ValueError("image_mean/image_std need 3 values (std > 0), sizes >= 1")
        return out


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(size=int, default_to_square=False)."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)


def preprocess(image: SubjectImage | np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """RGB8 (H,W,3) -> (3, crop_h, crop_w) float32 pixel values, as CLIPImageProcessor computes them."""
    from PIL import Image

    rgb = image.pixels if isinstance(image, SubjectImage) else image
    h, w = rgb.shape[:2]
    new_h, new_w = resize_output_size(h, w, config.shortest_edge)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=config.resample))
    ch, cw = config.crop
    top, left = (new_h - ch) // 2, (new_w - cw) // 2
    if top < 0 or left < 0:  # the crop is larger than the resized image: transformers pads with zeros
        padded = np.zeros((max(new_h, ch), max(new_w, cw), 3), np.uint8)
        pt, pl = (padded.shape[0] - new_h) // 2, (padded.shape[1] - new_w) // 2
        padded[pt:pt + new_h, pl:pl + new_w] = resized
        resized, new_h, new_w = padded, *padded.shape[:2]
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
    crop = resized[top:top + ch, left:left + cw]
    x = (crop.astype(np.float64) * config.rescale_factor).astype(np.float32)
    x = (x - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def canny(image: SubjectImage) -> SubjectImage:
    """The official control image: grey, Canny(100, 200), stacked to three channels."""
    try:
        import cv2
    except ImportError:
        raise SubjectError("--canny needs OpenCV: pip install 'eclipse-export[canny]' "
                              "(opencv-python-headless), or pass an edge image with --control-image") from None
    grey = cv2.cvtColor(image.pixels, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, CANNY_LOW, CANNY_HIGH)
    return SubjectImage(np.repeat(edges[:, :, None], 3, axis=2), f"canny({image.origin})")


# --- interleaving -----------------------------------------------------------------------------


def keyword_ids(tokenizer, keyword: str) -> list[int]:
    """The keyword's token ids without bos/eos (official: tokenizer(keyword).input_ids[1:-1])."""
    if not isinstance(keyword, str):
        raise SubjectError(f"a subject keyword must be a string, got {type(keyword).__name__}")
    ids = tokenizer.encode_words(keyword)
    if not ids:
        raise SubjectError(f"the subject keyword {keyword!r} tokenizes to nothing: give a word of the prompt")
    return ids


def interleave(input_ids: np.ndarray, hidden: np.ndarray, subjects: Sequence[tuple[Sequence[int], np.ndarray]]
               ) -> tuple[np.ndarray, list[list[bool]]]:
    """input_ids (B,T), hidden (B,T,E), subjects [(keyword ids, embedding (E,))] in order.
    Returns the new hidden states and, per prompt, per subject, whether any position matched."""
    out = hidden.copy()
    found = [[False] * len(subjects) for _ in range(input_ids.shape[0])]
    for b in range(input_ids.shape[0]):
        for s, (ids, embedding) in enumerate(subjects):
            hit = np.isin(input_ids[b], np.asarray(ids, dtype=input_ids.dtype))
            if hit.any():
                out[b, hit] = embedding
                found[b][s] = True
    return out, found
