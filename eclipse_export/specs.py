"""One declarative spec per exported component: I/O names, dtypes, symbolic shapes, dynamic
axes, sample inputs, shape ranges and parity tolerances per precision.

Export code (torch side) and the runtime (numpy side) both read these; nothing else in the
project branches on a component's name. No torch import here: the edge runtime uses it.

Shapes are tuples whose entries are ints or symbols. Symbols resolve against `dims`, a small
dict derived from the model configs (see `stack_dims`):
    B  batch (dynamic)              T  text length (77)
    D  CLIP embedding width (1280)  E  text hidden width (1280)
    C  latent channels (4)          S  MoVQ scale factor (8)
    h, w  latent height/width (dynamic); "S*h" is the image height.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

DYNAMIC_SYMBOLS = ("B", "h", "w")

BOS_ID, EOS_ID, PAD_ID = 49406, 49407, 0


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, dims) for d in self.shape)

    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> symbol for the axes that vary at run time."""
        out = {}
        for i, d in enumerate(self.shape):
            if isinstance(d, str) and any(s in DYNAMIC_SYMBOLS for s in d.split("*")):
                out[i] = d
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Tolerance:
    """Parity bounds of one output against the FP32 PyTorch reference."""

    min_cosine: float
    # absolute, for one call on the same inputs (outputs are of order 1); None: not bounded
    max_abs: float | None
    # after the sampling loop (None: min_cosine); see chained()
    chained_min_cosine: float | None = None

    def chained(self) -> "Tolerance":
        """For outputs at the end of the sampling loop. Differences compound over N steps and
        a random-weight decoder can turn a 1e-4 latent difference into one pixel 16 levels off
        (seen on the tiny preset: cosine 0.99999993, PSNR 71.6 dB, max abs 0.064), so there the
        direction (cosine) and the end-to-end image PSNR are the bounds."""
        return Tolerance(self.chained_min_cosine or self.min_cosine, None)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # precision -> tolerance applied to every output of this component
    tolerances: Mapping[str, Tolerance]
    # symbol -> (min, opt, max) for engine optimisation profiles
    shape_ranges: Mapping[str, tuple[int, int, int]]
    sample_inputs: Callable[[Mapping[str, int], np.random.Generator], dict[str, np.ndarray]]
    # ONNX op types kept in FP32 in the FP16 graph (the reasons are in `notes`)
    fp16_keep_fp32: tuple[str, ...] = ()
    # most batch rows the pipeline sends per prompt (engine profiles: 1..max prompts x this)
    rows_per_prompt: int = 1
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tolerance(self, precision: str) -> Tolerance:
        try:
            return self.tolerances[precision]
        except KeyError:
            raise KeyError(f"{self.name}: no parity tolerance written down for precision {precision!r}") from None

    def to_json(self, dims: Mapping[str, int]) -> dict:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dims": {k: dims[k] for k in sorted(dims)},
        }


def eval_dim(d: int | str, dims: Mapping[str, int]) -> int:
    if isinstance(d, int):
        return d
    value = 1
    for part in d.split("*"):
        value *= int(part) if part.isdigit() else dims[part]
    return value


# --- sample inputs (realistic values, not just noise) -----------------------------------------


def _token_batch(dims: Mapping[str, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-style ids: bos, some words, eos, then pad; lengths differ per row."""
    batch, length = dims["B"], dims["T"]
    ids = np.full((batch, length), PAD_ID, dtype=np.int32)
    mask = np.zeros((batch, length), dtype=np.int32)
    for b in range(batch):
        n = int(rng.integers(0, length - 1))  # words between bos and eos
        ids[b, 0] = BOS_ID
        ids[b, 1 : n + 1] = rng.integers(1, 49000, size=n)
        ids[b, n + 1] = EOS_ID
        mask[b, : n + 2] = 1
    return ids, mask


def _f32(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _text_encoder_inputs(dims, rng):
    ids, _ = _token_batch(dims, rng)
    return {"input_ids": ids}


def _prior_inputs(dims, rng):
    _, mask = _token_batch(dims, rng)
    b, t, d, e = dims["B"], dims["T"], dims["D"], dims["E"]
    return {
        "noise": _f32(rng, (b, d)),
        "text_embeds": _f32(rng, (b, d)),
        "text_hidden_states": _f32(rng, (b, t, e)),
        "attention_mask": mask,
    }


def _unet_inputs(dims, rng):
    b, c, h, w, d = dims["B"], dims["C"], dims["h"], dims["w"], dims["D"]
    return {
        "sample": _f32(rng, (b, c, h, w)),
        "timestep": np.array([rng.integers(0, 1000)], dtype=np.float32),
        "image_embeds": _f32(rng, (b, d)),
    }


def _movq_inputs(dims, rng):
    b, c, h, w = dims["B"], dims["C"], dims["h"], dims["w"]
    return {"latents": _f32(rng, (b, c, h, w))}


# --- tolerances -------------------------------------------------------------------------------
# fp32: ONNX Runtime vs PyTorch differ only by kernel summation order (~1e-6 relative).
FP32 = Tolerance(min_cosine=0.99999, max_abs=1e-3)
# fp16 vs the FP32 reference: 10-bit mantissa, so ~1e-3 relative per op; cosine is the bound
# that matters, max abs catches isolated blow-ups (overflow shows as NaN/Inf, always a failure).
FP16 = Tolerance(min_cosine=0.999, max_abs=0.25)
# int8 (Q/DQ on Conv/MatMul/Gemm, calibrated ranges) vs FP32: the bar for one call (the UNet's
# noise prediction) is cosine 0.99; max abs only catches blow-ups (a clipped outlier can move one
# value by a lot while the direction holds). After the loop the per-step error compounds: on the
# tiny preset (4 DDPM steps, CFG 4, 16 validation prompts) a UNet at noise-prediction cosine
# 0.9985 gave final latents at 0.975 and images at 17.8 dB. The chained bounds below (cosine 0.95
# here, 15 dB in MIN_IMAGE_PSNR_DB) are floors that catch broken graphs, not quality claims: the
# quality report (eclipse-bench --quality-prompts) is where INT8's loss is measured.
INT8 = Tolerance(min_cosine=0.99, max_abs=2.0, chained_min_cosine=0.95)
_TOL = {"fp32": FP32, "fp16": FP16, "int8": INT8}

# Statistics of normalisation layers (mean/variance over thousands of elements) are where FP16
# loses most; all four graphs keep them in FP32 (see docs/decisions.md for the measurements).
_NORMS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization")

# Batch 1..4 prompts; the UNet sees the CFG batch (negative + positive) so its range doubles.
# Latents 32..128 = images 256..1024 px, opt 512 px.
_BATCH = (1, 1, 4)
_CFG_BATCH = (1, 2, 8)
_LATENT = (32, 64, 128)

TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    description="CLIP ViT-bigG/14 text tower: pooled+projected embedding and last hidden state",
    inputs=(TensorSpec("input_ids", "int32", ("B", "T")),),
    outputs=(
        TensorSpec("text_embeds", "float32", ("B", "D")),
        TensorSpec("text_hidden_states", "float32", ("B", "T", "E")),
    ),
    tolerances=_TOL,
    # with a negative prompt the prompts and negatives share one batch
    shape_ranges={"B": (1, 2, 8)},
    sample_inputs=_text_encoder_inputs,
    fp16_keep_fp32=_NORMS,
    rows_per_prompt=2,  # prompts and their negative prompts in one batch
)

PRIOR = ComponentSpec(
    name="prior",
    description="ECLIPSE prior: one forward pass from text embeddings (+ noise) to a CLIP image embedding",
    inputs=(
        TensorSpec("noise", "float32", ("B", "D")),
        TensorSpec("text_embeds", "float32", ("B", "D")),
        TensorSpec("text_hidden_states", "float32", ("B", "T", "E")),
        TensorSpec("attention_mask", "int32", ("B", "T")),
    ),
    outputs=(TensorSpec("image_embeds", "float32", ("B", "D")),),
    tolerances=_TOL,
    shape_ranges={"B": (1, 2, 8)},
    sample_inputs=_prior_inputs,
    fp16_keep_fp32=_NORMS,
    rows_per_prompt=2,  # prompts and their negative prompts in one batch
)

UNET = ComponentSpec(
    name="unet",
    description="Kandinsky 2.2 UNet: noise prediction (first C channels only; variance is not learned)",
    inputs=(
        TensorSpec("sample", "float32", ("B", "C", "h", "w")),
        TensorSpec("timestep", "float32", (1,)),
        TensorSpec("image_embeds", "float32", ("B", "D")),
    ),
    outputs=(TensorSpec("noise_pred", "float32", ("B", "C", "h", "w")),),
    tolerances=_TOL,
    shape_ranges={"B": _CFG_BATCH, "h": _LATENT, "w": _LATENT},
    sample_inputs=_unet_inputs,
    # The sinusoidal timestep embedding and its argument (t * freq, t up to 999) stay FP32: in
    # FP16 the argument is off by up to 0.25 rad, which made Sin/Cos 1-5 % wrong and was most of
    # the UNet's FP16 error (tiny preset: step-0 cosine 0.99997 -> 0.9999993, see decisions.md).
    fp16_keep_fp32=_NORMS + ("Sin", "Cos"),
    rows_per_prompt=2,  # classifier-free guidance: [negative, positive]
    notes=("~5 GB of fp32 weights at full size: exported with ONNX external data",
           "FP16: the timestep embedding's Sin/Cos and their argument are computed in FP32"),
)

MOVQ = ComponentSpec(
    name="movq",
    description="MoVQ decoder (spatial norm, no quantisation) with the post-processing to [0,1] NHWC",
    inputs=(TensorSpec("latents", "float32", ("B", "C", "h", "w")),),
    outputs=(TensorSpec("image", "float32", ("B", "S*h", "S*w", 3)),),
    tolerances=_TOL,
    shape_ranges={"B": _BATCH, "h": _LATENT, "w": _LATENT},
    sample_inputs=_movq_inputs,
    fp16_keep_fp32=_NORMS,
)

COMPONENTS: dict[str, ComponentSpec] = {s.name: s for s in (TEXT_ENCODER, PRIOR, UNET, MOVQ)}

# End-to-end bound on the final 8-bit image against the PyTorch reference, per precision.
# int8: a floor against broken graphs, not a quality claim (see INT8 above; measured tiny: 17.8 dB)
MIN_IMAGE_PSNR_DB = {"fp32": 50.0, "fp16": 30.0, "int8": 15.0}

PRECISIONS = ("fp32", "fp16", "int8")


def stack_dims(configs: Mapping[str, Mapping]) -> dict[str, int]:
    """Static dims of a stack from its component configs (see module docstring)."""
    text, prior, unet, movq = configs["text_encoder"], configs["prior"], configs["unet"], configs["movq"]
    dims = {
        "T": int(text["max_position_embeddings"]),
        "D": int(text["projection_dim"]),
        "E": int(text["hidden_size"]),
        "C": int(unet["in_channels"]),
        "S": 2 ** (len(movq["block_out_channels"]) - 1),
    }
    # The chain only works if the pieces agree; say which ones do not.
    checks = {
        "prior embedding_dim == text projection_dim": prior["embedding_dim"] == dims["D"],
        "prior embedding_dim == text hidden_size": prior["embedding_dim"] == dims["E"],
        "prior num_embeddings == text length": prior["num_embeddings"] == dims["T"],
        "unet encoder_hid_dim == CLIP width": unet["encoder_hid_dim"] == dims["D"],
        "movq latent_channels == unet in_channels": movq["latent_channels"] == dims["C"],
    }
    broken = [k for k, ok in checks.items() if not ok]
    if broken:
        raise ValueError("incompatible component configs: " + "; ".join(broken))
    return dims
