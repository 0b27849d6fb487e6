"""A generation request (validated once, before any work) and its result."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from eclipse_export.runtime.noise import Noises
from eclipse_export.runtime.subjects import SubjectError, SubjectImage, canny, load_image

MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 64, 2048, 64


class GenerationError(ValueError):
    """Bad generation request (the message is meant for the user, one line)."""


@dataclass(frozen=True)
class Request:
    """A validated generation request. Validation happens here, once, before any work."""

    prompts: tuple[str, ...]
    negative_prompt: str | None = None
    height: int = 512
    width: int = 512
    steps: int = 50
    guidance_scale: float = 4.0
    seed: int = 0
    scheduler: str | None = None  # None: the bundle's scheduler class
    # λ-ECLIPSE bundles: (decoded image, keyword) in order (a later subject wins a shared token),
    # and the control (edge) image; plain ECLIPSE bundles refuse both
    subjects: tuple[tuple[SubjectImage, str], ...] = ()
    control: SubjectImage | None = None

    @staticmethod
    def make(prompt: str | Sequence[str], negative_prompt: str | None = None, height: int = 512,
             width: int = 512, steps: int = 50, guidance_scale: float = 4.0, seed: int = 0,
             scheduler: str | None = None, subjects: Sequence | None = None, control_image=None,
             canny_image=None) -> tuple["Request", list[str]]:
        """Returns the request and warnings for the user. `subjects`: [(image, keyword), ...]
        (image: a path, a PIL image or an RGB8 array); `control_image`: an edge map used as it
        is; `canny_image`: a reference image whose Canny edges become the edge map."""
        warnings = []
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
        if not prompts:
            raise GenerationError("no prompt given")
        if not all(isinstance(p, str) for p in prompts):
            raise GenerationError("prompts must be strings")
        if any(not p.strip() for p in prompts):
            # as the official ECLIPSE pipeline: an empty prompt is unconditional generation
            warnings.append("the prompt is empty: generating without text conditioning")
        # None and "" differ, as in the official ECLIPSE code (KandinskyPriorPipeline): None uses
        # the CLIP image embedding of a zeros image (the bundle's negative_image_embeds.npy); any
        # string, "" included, is run through the prior like the prompt.
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise GenerationError(f"the negative prompt must be a string or None, got {type(negative_prompt).__name__}")
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise GenerationError(f"{name} must be an integer, got {value!r}")
            if value % SIZE_MULTIPLE or not MIN_SIZE <= value <= MAX_SIZE:
                raise GenerationError(
                    f"{name} {value} must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}"
                )
        if not isinstance(steps, int) or steps < 1:
            raise GenerationError(f"steps must be a whole number >= 1, got {steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise GenerationError(f"guidance scale must be a finite number, got {guidance_scale!r}")
        if guidance_scale < 1:
            warnings.append(f"guidance scale {guidance_scale} < 1 means no classifier-free guidance (same as 1)")
        if negative_prompt is not None and guidance_scale <= 1:
            warnings.append("the negative prompt has no effect without classifier-free guidance (guidance <= 1)")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise GenerationError(f"seed must be an integer in 0..2^64-1, got {seed!r}")
        decoded, control = _subject_images(subjects, control_image, canny_image)
        req = Request(prompts, negative_prompt, height, width, steps, float(guidance_scale), seed, scheduler,
                      decoded, control)
        return req, warnings

    @property
    def batch(self) -> int:
        return len(self.prompts)


def _subject_images(subjects, control_image, canny_image):
    """Decode every image now: a missing or broken file is found before any graph runs."""
    if isinstance(subjects, (str, bytes)) or (subjects is not None and not isinstance(subjects, Sequence)):
        raise GenerationError("subjects must be a list of (image, keyword) pairs")
    decoded = []
    try:
        for i, item in enumerate(subjects or ()):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise GenerationError(f"subject {i + 1} must be an (image, keyword) pair, got {item!r:.60}")
            image, keyword = item
            if not isinstance(keyword, str):
                raise GenerationError(f"subject {i + 1}: the keyword must be a string, got {type(keyword).__name__}")
            if not keyword.strip():
                raise GenerationError(f"subject {i + 1}: the keyword {keyword!r} tokenizes to nothing; give the prompt "
                                      "word the image stands for")
            decoded.append((load_image(image, f"subject image {i + 1} ({keyword})"), keyword.strip()))
        if control_image is not None and canny_image is not None:
            raise GenerationError("give either an edge image (control_image) or a reference for Canny (canny_image), "
                                  "not both")
        control = None
        if control_image is not None:
            control = load_image(control_image, "control image")
        elif canny_image is not None:
            control = canny(load_image(canny_image, "Canny reference image"))
    except SubjectError as e:
        raise GenerationError(str(e)) from None
    return tuple(decoded), control


@dataclass
class Generation:
    images: np.ndarray  # (B,H,W,3) uint8
    request: Request
    noises: Noises
    timings: dict[str, float]  # seconds per stage, and "total"
    warnings: list[str] = field(default_factory=list)
    # Stage outputs by name (see Pipeline.generate); filled when record=True.
    intermediates: dict[str, np.ndarray] = field(default_factory=dict)
