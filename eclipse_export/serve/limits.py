"""What a served model accepts, and the one place requests are validated (the Triton models and
the Ray Serve app share it). A request carries values only: never a path, never a bundle name:
the server serves the bundle it was configured with.

Limits come from the repository's configuration (written at repository creation) and, for
engine bundles, from the engines' optimisation profiles, which no request may exceed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from eclipse_export.runtime.noise import SEED_MAX
from eclipse_export.runtime.request import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE


class RequestError(ValueError):
    """A bad request: the message goes back to the client; the model keeps serving."""


@dataclass(frozen=True)
class ServeLimits:
    max_batch: int = 4  # prompts per execution (Triton's max_batch_size, the engines' profile)
    max_steps: int = 100
    min_size: int = MIN_SIZE
    max_size: int = 1024
    # a fixed size (engines built with --static): every request must ask for it
    static_size: tuple[int, int] | None = None
    # CLIP truncates at 77 tokens; far longer text is never useful and only costs tokenizer time
    max_prompt_bytes: int = 2048
    # defaults for the optional inputs
    default_steps: int = 50
    default_guidance: float = 4.0
    default_size: int = 512

    def to_json(self) -> dict:
        d = asdict(self)
        d["static_size"] = list(self.static_size) if self.static_size else None
        return d

    @staticmethod
    def from_json(d: dict) -> "ServeLimits":
        known = {f.name for f in fields(ServeLimits)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown serving limits {sorted(unknown)}")
        d = dict(d)
        if d.get("static_size"):
            d["static_size"] = tuple(int(v) for v in d["static_size"])
        return ServeLimits(**d).checked()

    def checked(self) -> "ServeLimits":
        """Refuse a configuration that no request could satisfy (repository creation time)."""
        problems = []
        if self.max_batch < 1:
            problems.append("max batch must be >= 1")
        if self.max_steps < 1 or not 1 <= self.default_steps <= self.max_steps:
            problems.append(f"steps: default {self.default_steps} must be within 1..max {self.max_steps}")
        for name, v in (("min size", self.min_size), ("max size", self.max_size), ("default size", self.default_size)):
            if v % SIZE_MULTIPLE or not MIN_SIZE <= v <= MAX_SIZE:
                problems.append(f"{name} {v} must be a multiple of {SIZE_MULTIPLE} in {MIN_SIZE}..{MAX_SIZE}")
        if not self.min_size <= self.default_size <= self.max_size:
            problems.append(f"default size {self.default_size} outside {self.min_size}..{self.max_size}")
        if self.max_prompt_bytes < 1:
            problems.append("max prompt bytes must be >= 1")
        if not math.isfinite(self.default_guidance):
            problems.append("default guidance must be finite")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def limits_for_bundle(manifest: dict, requested: ServeLimits) -> ServeLimits:
    """`requested` narrowed to what the bundle's engines accept: TensorRT engines have one
    optimisation profile (batch 1..max prompts x rows per prompt, latent sizes min..max, or one
    static size); ONNX Runtime bundles take any size and batch, so the request stands."""
    engines = manifest.get("engines") or {}
    dims = manifest.get("dims") or {}
    scale = int(dims.get("S", 8))
    limits = requested
    for name, entry in engines.items():
        profile = entry.get("profile") or {}
        for tensor, (lo, _opt, hi) in profile.items():
            if name == "unet" and tensor == "sample":
                # CFG doubles the UNet's rows: a prompt takes 2 of them
                limits = _narrow(limits, prompts=max(1, hi[0] // 2), lo_hw=lo[2:], hi_hw=hi[2:], scale=scale,
                                 static=bool(entry.get("static")))
            elif name == "movq" and tensor == "latents":
                limits = _narrow(limits, prompts=hi[0], lo_hw=lo[2:], hi_hw=hi[2:], scale=scale,
                                 static=bool(entry.get("static")))
    return limits.checked()


def _narrow(limits: ServeLimits, prompts: int, lo_hw, hi_hw, scale: int, static: bool) -> ServeLimits:
    from dataclasses import replace

    lo = max(int(v) * scale for v in lo_hw)
    hi = min(int(v) * scale for v in hi_hw)
    new = replace(limits, max_batch=min(limits.max_batch, prompts),
                  min_size=max(limits.min_size, _round_up(lo)), max_size=min(limits.max_size, hi - hi % SIZE_MULTIPLE))
    if static:
        new = replace(new, static_size=(int(hi_hw[0]) * scale, int(hi_hw[1]) * scale))
    if not new.min_size <= new.default_size <= new.max_size:
        new = replace(new, default_size=new.max_size if new.default_size > new.max_size else new.min_size)
    if new.static_size:
        new = replace(new, default_size=new.static_size[0])
    return new


def _round_up(v: int) -> int:
    return -(-v // SIZE_MULTIPLE) * SIZE_MULTIPLE


@dataclass(frozen=True)
class Item:
    """One image to generate: a validated row of a request."""

    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance: float
    height: int
    width: int

    def group_key(self) -> tuple:
        """Items with equal keys can share one batched pipeline run."""
        return (self.height, self.width, self.steps, self.guidance, self.negative_prompt)


def _text(value, name: str, limits: ServeLimits) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) > limits.max_prompt_bytes:
            raise RequestError(f"{name} is {len(raw)} bytes; at most {limits.max_prompt_bytes}")
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{name} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise RequestError(f"{name} must be text, got {type(value).__name__}")
    if len(value.encode("utf-8")) > limits.max_prompt_bytes:
        raise RequestError(f"{name} is longer than {limits.max_prompt_bytes} bytes")
    if "\x00" in value:
        raise RequestError(f"{name} contains a NUL character")
    return value


def _int(value, name: str, lo: int, hi: int) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"{name} must be a whole number, got {value!r}") from None
    if not lo <= number <= hi:
        raise RequestError(f"{name} {number} is outside {lo}..{hi}")
    return number


def validate_item(limits: ServeLimits, prompt, negative_prompt=None, seed=None, steps=None, guidance=None,
                  height=None, width=None) -> Item:
    """One row of a request -> Item, or RequestError saying what is wrong. None: the default."""
    prompt = _text(prompt, "PROMPT", limits)
    negative = None if negative_prompt is None else _text(negative_prompt, "NEGATIVE_PROMPT", limits)
    seed = 0 if seed is None else _int(seed, "SEED", 0, SEED_MAX)
    steps = limits.default_steps if steps is None else _int(steps, "STEPS", 1, limits.max_steps)
    if guidance is None:
        guidance = limits.default_guidance
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise RequestError(f"GUIDANCE must be a number, got {guidance!r}") from None
    if not math.isfinite(guidance) or not 0.0 <= guidance <= 100.0:
        raise RequestError(f"GUIDANCE {guidance} is outside 0..100")
    size = {}
    for name, value in (("HEIGHT", height), ("WIDTH", width)):
        if limits.static_size and value is not None and _int(value, name, 0, 1 << 31) != limits.static_size[len(size)]:
            h, w = limits.static_size
            raise RequestError(f"this model serves {h}x{w} images only (its engines are static)")
        if value is None:
            value = limits.static_size[len(size)] if limits.static_size else limits.default_size
        else:
            value = _int(value, name, limits.min_size, limits.max_size)
        if value % SIZE_MULTIPLE:
            raise RequestError(f"{name} {value} is not a multiple of {SIZE_MULTIPLE}")
        size[name] = value
    return Item(prompt, negative, seed, steps, guidance, size["HEIGHT"], size["WIDTH"])
