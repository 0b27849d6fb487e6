"""Kandinsky 2.2 + ECLIPSE components: one spec per exported graph (see families/spec.py).

Symbols of the shapes below, resolved by `stack_dims` from the component configs:
    B  batch (dynamic)              T  text length (77)
    D  CLIP embedding width (1280)  E  text hidden width (1280)
    C  latent channels (4)          S  MoVQ scale factor (8)
    h, w  latent height/width (dynamic); "S*h" is the image height.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from eclipse_export.families.spec import NORMS, TOLERANCES, ComponentSpec, TensorSpec

BOS_ID, EOS_ID, PAD_ID = 49406, 49407, 0


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
    tolerances=TOLERANCES,
    # with a negative prompt the prompts and negatives share one batch
    shape_ranges={"B": (1, 2, 8)},
    sample_inputs=_text_encoder_inputs,
    fp16_keep_fp32=NORMS,
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
    tolerances=TOLERANCES,
    shape_ranges={"B": (1, 2, 8)},
    sample_inputs=_prior_inputs,
    fp16_keep_fp32=NORMS,
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
    tolerances=TOLERANCES,
    shape_ranges={"B": _CFG_BATCH, "h": _LATENT, "w": _LATENT},
    sample_inputs=_unet_inputs,
    # The sinusoidal timestep embedding and its argument (t * freq, t up to 999) stay FP32: in
    # FP16 the argument is off by up to 0.25 rad, which made Sin/Cos 1-5 % wrong and was most of
    # the UNet's FP16 error (tiny preset: step-0 cosine 0.99997 -> 0.9999993, see decisions.md).
    fp16_keep_fp32=NORMS + ("Sin", "Cos"),
    rows_per_prompt=2,  # classifier-free guidance: [negative, positive]
    denoiser=True,
    notes=("~5 GB of fp32 weights at full size: exported with ONNX external data",
           "FP16: the timestep embedding's Sin/Cos and their argument are computed in FP32"),
)

MOVQ = ComponentSpec(
    name="movq",
    description="MoVQ decoder (spatial norm, no quantisation) with the post-processing to [0,1] NHWC",
    inputs=(TensorSpec("latents", "float32", ("B", "C", "h", "w")),),
    outputs=(TensorSpec("image", "float32", ("B", "S*h", "S*w", 3)),),
    tolerances=TOLERANCES,
    shape_ranges={"B": _BATCH, "h": _LATENT, "w": _LATENT},
    sample_inputs=_movq_inputs,
    fp16_keep_fp32=NORMS,
)

COMPONENTS: dict[str, ComponentSpec] = {s.name: s for s in (TEXT_ENCODER, PRIOR, UNET, MOVQ)}


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
