"""λ-ECLIPSE components: text encoder, UNet and MoVQ are Kandinsky 2.2's (same specs); new are the
image encoder (CLIP ViT-bigG/14 vision tower + projection) and the λ prior (81 tokens: 77 text
states with subject embeddings interleaved, control, text_embeds, noise, prd).

Symbols: those of families/kandinsky22/components.py, plus R, the image encoder's input size (224).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from eclipse_export.families.kandinsky22 import components as k22
from eclipse_export.families.spec import NORMS, TOLERANCES, ComponentSpec, TensorSpec


def _image_encoder_inputs(dims, rng):
    # normalised CLIP pixels: roughly (x - mean) / std of [0,1] images, so values in about [-2, 2]
    b, r = dims["B"], dims["R"]
    pixels = (rng.random((b, 3, r, r), dtype=np.float32) - 0.45) / 0.27
    return {"pixel_values": pixels.astype(np.float32)}


def _prior_inputs(dims, rng):
    out = k22._prior_inputs(dims, rng)
    out["control_embeds"] = rng.standard_normal((dims["B"], dims["D"]), dtype=np.float32)
    return out


IMAGE_ENCODER = ComponentSpec(
    name="image_encoder",
    description="CLIP ViT-bigG/14 vision tower + projection: one subject (or edge) image -> image_embeds",
    inputs=(TensorSpec("pixel_values", "float32", ("B", 3, "R", "R")),),
    outputs=(TensorSpec("image_embeds", "float32", ("B", "D")),),
    tolerances=TOLERANCES,
    # the runtime embeds one image per call (per-subject latency; any number of subjects)
    shape_ranges={"B": (1, 1, 4)},
    sample_inputs=_image_encoder_inputs,
    fp16_keep_fp32=NORMS,
    notes=("1.84 B parameters at full size: exported with ONNX external data",),
)

PRIOR = ComponentSpec(
    name="prior",
    description="λ-ECLIPSE prior: text (subject embeddings interleaved) + control embedding + noise -> image embedding",
    inputs=(
        TensorSpec("noise", "float32", ("B", "D")),
        TensorSpec("text_embeds", "float32", ("B", "D")),
        TensorSpec("text_hidden_states", "float32", ("B", "T", "E")),
        TensorSpec("attention_mask", "int32", ("B", "T")),
        TensorSpec("control_embeds", "float32", ("B", "D")),
    ),
    outputs=(TensorSpec("image_embeds", "float32", ("B", "D")),),
    tolerances=TOLERANCES,
    shape_ranges={"B": (1, 1, 4)},
    sample_inputs=_prior_inputs,
    fp16_keep_fp32=NORMS,
)

# the official λ pipeline takes no negative prompt: one text row per prompt
TEXT_ENCODER = replace(k22.TEXT_ENCODER, shape_ranges={"B": (1, 1, 4)}, rows_per_prompt=1)

COMPONENTS: dict[str, ComponentSpec] = {
    s.name: s for s in (TEXT_ENCODER, IMAGE_ENCODER, PRIOR, k22.UNET, k22.MOVQ)
}


def stack_dims(configs: Mapping[str, Mapping]) -> dict[str, int]:
    dims = k22.stack_dims(configs)
    image, prior = configs["image_encoder"], configs["prior"]
    dims["R"] = int(image["image_size"])
    checks = {
        "image_encoder projection_dim == text projection_dim": image["projection_dim"] == dims["D"],
        # subject embeddings replace text hidden states in place
        "text hidden_size == CLIP embedding width": dims["E"] == dims["D"],
        "prior additional_embeddings == 4 (control, text_embeds, noise, prd)": prior["additional_embeddings"] == 4,
    }
    broken = [k for k, ok in checks.items() if not ok]
    if broken:
        raise ValueError("incompatible component configs: " + "; ".join(broken))
    return dims
