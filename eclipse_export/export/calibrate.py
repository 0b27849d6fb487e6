"""INT8 calibration data: the real inputs each component sees when the FP32 chain runs.

The FP32 graphs run on ONNX Runtime (the same numbers as PyTorch, see the ONNX-chain parity
tests, at a third of the cost) over the calibration prompts. Each prompt writes one shard
(`<index>.npz`, atomically) holding every component's inputs; the UNet's are taken at a few
steps per prompt, stratified over the schedule with a per-prompt offset so that the prompts
together cover the whole denoising trajectory. Each UNet sample holds the full CFG batch, so
both halves (unconditional and conditional) are calibrated.

Bounded: one prompt's tensors in memory at a time, a fixed number of UNet steps on disk per
prompt. Resumable: shards already on disk (complete, because written atomically) are skipped.
No torch: this runs wherever the runtime runs.

λ-ECLIPSE bundles calibrate on subject images too: each prompt gets one subject drawn here
(`drawn_subject`: coloured shapes on white, as λ's subjects are cut out on white; never a
downloaded image) standing for the prompt's last word, and every other prompt an edge map
(the drawing's outline), so the image encoder's inputs and the prior's control token are real.
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


@dataclass(frozen=True)
class CaptureOptions:
    height: int = 256
    width: int = 256
    steps: int = 25
    unet_steps_per_prompt: int = 4
    guidance_scale: float = 4.0
    seed: int = 0


def stratified_steps(steps: int, k: int, prompt_index: int, seed: int) -> list[int]:
    """k step indices, one per equal stratum of [0, steps), offset per prompt (deterministic)."""
    k = min(k, steps)
    rng = np.random.default_rng([seed, prompt_index])
    edges = [round(j * steps / k) for j in range(k + 1)]  # k non-empty integer strata
    return [int(rng.integers(lo, hi)) for lo, hi in zip(edges[:-1], edges[1:])]


class _Recorder:
    """Wraps a Session and keeps copies of the inputs of the calls it is told to keep."""

    def __init__(self, session, keep: Callable[[int], bool] = lambda i: True):
        self.session, self.spec, self.keep = session, session.spec, keep
        self.calls = 0
        self.records: list[dict[str, np.ndarray]] = []

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.keep(self.calls):
            self.records.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        self.calls += 1
        return self.session.run(inputs)


def capture(pipeline, prompts: Sequence, out_dir: Path, options: CaptureOptions = CaptureOptions(),
            log: Log = print) -> dict:
    """Run the chain over `prompts` (objects with .id and .prompt, or strings); write shards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sessions = dict(pipeline.sessions)
    started, done, skipped = time.perf_counter(), 0, 0
    try:
        for i, p in enumerate(prompts):
            shard = out_dir / f"{i:05d}.npz"
            if shard.is_file():
                skipped += 1
                continue
            text = getattr(p, "prompt", p)
            steps = set(stratified_steps(options.steps, options.unet_steps_per_prompt, i, options.seed))
            rec = {name: _Recorder(s, (lambda c, steps=steps: c in steps) if name == "unet" else (lambda c: True))
                   for name, s in sessions.items()}
            pipeline.sessions = rec
            pipeline.generate(text, height=options.height, width=options.width, steps=options.steps,
                              guidance_scale=options.guidance_scale, seed=options.seed + i,
                              **(_subject_kwargs(text, i, options.seed) if "image_encoder" in sessions else {}))
            arrays = {f"{name}/{k}": np.stack([r[k] for r in r_.records])
                      for name, r_ in rec.items() for k in r_.spec.input_names}
            arrays["prompt"] = np.array(text)
            arrays["unet_steps"] = np.array(sorted(steps))
            _save_atomic(shard, arrays)
            done += 1
            elapsed = time.perf_counter() - started
            left = (len(prompts) - i - 1) * elapsed / done
            log(f"  calibration {i + 1}/{len(prompts)}  ({elapsed:.0f} s, ~{left:.0f} s left)")
    finally:
        pipeline.sessions = sessions
    return {"prompts": len(prompts), "captured": done, "resumed": skipped,
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
        for j in range(len(stacked[names[0]])):
            if limit is not None and count >= limit:
                return
            yield {n: stacked[n][j] for n in names}
            count += 1
