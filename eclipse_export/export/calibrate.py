"""INT8 calibration data: the real inputs each component sees when the FP32 chain runs.

The family's driver runs the FP32 graphs on ONNX Runtime (the same numbers as PyTorch, see the
ONNX-chain parity tests, at a third of the cost) over the calibration prompts, and every graph
call's inputs are recorded. What is recorded is the family's data (`Family.calibration`): its
looped denoisers (Kandinsky's UNet; Karlo's decoder and first super-resolution UNet) at a few
calls per prompt, stratified over the calls the chain made with a per-prompt offset, so that the
prompts together cover the whole denoising trajectory; everything else at every call (Karlo's
super_res_last runs once). Each denoiser sample holds the full CFG batch, so both halves
(unconditional and conditional) are calibrated. Each prompt writes one shard (`<index>.npz`,
atomically) holding every component's inputs and the family's name.

Bounded: one prompt's tensors in memory at a time, a fixed number of denoiser calls on disk per
prompt. Resumable: shards already on disk (complete, because written atomically) are skipped, and
a shard of another family is refused, never used. No torch: this runs wherever the runtime runs.

Families whose requests take subject images (λ-ECLIPSE: `Calibration.subjects`) calibrate on
subject images too: each prompt gets one subject drawn here (`drawn_subject`: coloured shapes on
white, as λ's subjects are cut out on white; never a downloaded image) standing for the prompt's
last word, and every other prompt an edge map (the drawing's outline), so the image encoder's
inputs and the prior's control token are real.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Log = Callable[[str], None]


# what a capture uses where neither the options nor the family's driver say (Kandinsky's chain
# takes any size: 256x256 keeps calibration cheap; its pipelines' guidance default)
DEFAULT_SIZE, DEFAULT_GUIDANCE = (256, 256), 4.0


@dataclass(frozen=True)
class CaptureOptions:
    # None: the size the family's driver fixes (Karlo: its super-resolution size), else DEFAULT_SIZE
    height: int | None = None
    width: int | None = None
    steps: int = 25
    # calls recorded per prompt of each component the family samples (Calibration.sampled)
    loop_calls_per_prompt: int = 4
    # None: the family driver's default guidance (Karlo: 8.0), else DEFAULT_GUIDANCE
    guidance_scale: float | None = None
    seed: int = 0

    def resolved(self, driver) -> CaptureOptions:
        """Sizes and guidance filled in from the family's driver (its request_defaults)."""
        from dataclasses import replace

        defaults = getattr(driver, "request_defaults", None)
        defaults = defaults(driver.bundle) if defaults is not None else {}
        return replace(self, height=self.height or defaults.get("height", DEFAULT_SIZE[0]),
                       width=self.width or defaults.get("width", DEFAULT_SIZE[1]),
                       guidance_scale=(self.guidance_scale if self.guidance_scale is not None
                                       else defaults.get("guidance_scale", DEFAULT_GUIDANCE)))


def stratified_steps(steps: int, k: int, prompt_index: int, seed: int) -> list[int]:
    """k step (call) indices, one per equal stratum of [0, steps), offset per prompt
    (deterministic); all of them where steps <= k."""
    k = min(k, steps)
    if k <= 0:
        return []
    rng = np.random.default_rng([seed, prompt_index])
    edges = [round(j * steps / k) for j in range(k + 1)]  # k non-empty integer strata
    return [int(rng.integers(lo, hi)) for lo, hi in zip(edges[:-1], edges[1:])]


class _Recorder:
    """Wraps a Session and keeps a copy of the inputs of every call (one prompt's worth)."""

    def __init__(self, session):
        self.session, self.spec = session, session.spec
        self.records: list[dict[str, np.ndarray]] = []

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.records.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return self.session.run(inputs)


class ForeignShard(ValueError):
    """A cached shard recorded on another family's chain."""


def _shard_family(path: Path) -> str | None:
    with np.load(path) as z:
        return str(z["family"]) if "family" in z.files else None


def capture(pipeline, prompts: Sequence, out_dir: Path, options: CaptureOptions = CaptureOptions(),
            log: Log = print) -> dict:
    """Run the family's chain over `prompts` (objects with .id and .prompt, or strings); write
    shards. What is recorded, and how the requests are made, is the family's `calibration`."""
    family = pipeline.bundle.family
    plan = family.calibration
    if plan is None:
        raise ValueError(f"the {family.title} family has no INT8 calibration")
    options = options.resolved(pipeline.chain)
    out_dir.mkdir(parents=True, exist_ok=True)
    sessions = dict(pipeline.sessions)
    started, done, skipped = time.perf_counter(), 0, 0
    try:
        for i, p in enumerate(prompts):
            shard = out_dir / f"{i:05d}.npz"
            if shard.is_file():
                recorded_on = _shard_family(shard)
                if recorded_on != family.name:
                    raise ForeignShard(f"{shard} was recorded on the {recorded_on or 'kandinsky22'} chain, not "
                                       f"{family.name}'s: use another calibration cache")
                skipped += 1
                continue
            text = getattr(p, "prompt", p)
            rec = {name: _Recorder(s) for name, s in sessions.items()}
            pipeline.sessions = rec
            pipeline.generate(text, height=options.height, width=options.width, steps=options.steps,
                              guidance_scale=options.guidance_scale, seed=options.seed + i,
                              **(_subject_kwargs(text, i, options.seed) if plan.subjects else {}))
            arrays = {"prompt": np.array(text), "family": np.array(family.name)}
            for name, r in rec.items():
                keep = range(len(r.records))
                if name in plan.sampled:  # a few calls, one per stratum of the calls made
                    keep = stratified_steps(len(r.records), options.loop_calls_per_prompt, i, options.seed)
                    arrays[f"calls/{name}"] = np.array(keep)
                if not keep:
                    continue
                arrays.update({f"{name}/{k}": np.stack([r.records[j][k] for j in keep]) for k in r.spec.input_names})
            pipeline.sessions = sessions
            del rec
            _save_atomic(shard, arrays)
            done += 1
            elapsed = time.perf_counter() - started
            left = (len(prompts) - i - 1) * elapsed / done
            log(f"  calibration {i + 1}/{len(prompts)}  ({elapsed:.0f} s, ~{left:.0f} s left)")
    finally:
        pipeline.sessions = sessions
    return {"family": family.name, "prompts": len(prompts), "captured": done, "resumed": skipped,
            "seconds": round(time.perf_counter() - started, 1), "options": options.__dict__}


def drawn_subject(index: int, seed: int = 0, size: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """A subject image drawn by the project (RGB8, coloured shapes on white) and its edge map
    (white outlines on black), deterministic in (index, seed)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index, 19])
    image = Image.new("RGB", (size, size), (255, 255, 255))
    edges = Image.new("RGB", (size, size), (0, 0, 0))
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, size * 2 // 3, 2))
        x1, y1 = x0 + int(rng.integers(size // 6, size // 2)), y0 + int(rng.integers(size // 6, size // 2))
        fill = tuple(int(v) for v in rng.integers(0, 230, 3))
        shape = int(rng.integers(0, 3))
        for draw, kw in ((ImageDraw.Draw(image), {"fill": fill}), (ImageDraw.Draw(edges), {"outline": (255,) * 3, "width": 2})):
            if shape == 0:
                draw.ellipse((x0, y0, x1, y1), **kw)
            elif shape == 1:
                draw.rectangle((x0, y0, x1, y1), **kw)
            else:
                draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], **kw)
    return np.asarray(image), np.asarray(edges)


def _subject_kwargs(prompt: str, index: int, seed: int) -> dict:
    words = [w.strip(".,;:!?\"'()") for w in prompt.split()]
    keyword = next((w for w in reversed(words) if len(w) > 2), words[-1] if words else "thing") or "thing"
    image, edges = drawn_subject(index, seed)
    return {"subjects": [(image, keyword)], "control_image": edges if index % 2 else None}


def _save_atomic(path: Path, arrays: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def iter_feeds(shard_dir: Path, component: str, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One feed (input name -> array) per recorded call of `component`, shard by shard."""
    count = 0
    for shard in sorted(shard_dir.glob("*.npz")):
        with np.load(shard) as z:
            # the shard names its component's inputs ("component/input"): any family's
            names = [k.split("/", 1)[1] for k in z.files if k.startswith(component + "/")]
            stacked = {n: z[f"{component}/{n}"] for n in names}
        if not names:  # the component made no call for this prompt
            continue
        for j in range(len(stacked[names[0]])):
            if limit is not None and count >= limit:
                return
            yield {n: stacked[n][j] for n in names}
            count += 1
