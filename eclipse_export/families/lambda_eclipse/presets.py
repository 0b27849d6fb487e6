"""Architecture configs of λ-ECLIPSE stacks (stack-facts.md, "λ-ECLIPSE"): the Kandinsky 2.2
decoder and bigG text tower of plain ECLIPSE, the ViT-bigG/14 image tower (it ships in λ
bundles: it embeds every subject image), and the λ prior (ECLIPSE + a control token: 81 tokens).

Torch-free, like families/kandinsky22/presets.py whose dicts it reuses.
"""

from __future__ import annotations

import copy

from eclipse_export.families.kandinsky22 import presets as k22

# ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0 (34,849,536 parameters): plain ECLIPSE plus
# `embedding_control` (Linear 1280->512) and one more positional row (81 tokens).
PRIOR_LAMBDA = {**k22.PRIOR_ECLIPSE, "additional_embeddings": 4}
PRIOR_LAMBDA_TINY = {**k22.PRIOR_TINY, "additional_embeddings": 4}

# kandinsky-community/kandinsky-2-2-prior image_processor/preprocessor_config.json (CLIPImageProcessor)
IMAGE_PROCESSOR_CLIP = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,  # PIL bicubic
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}

PRESETS = {
    # tiny keeps the structure: ViT patch embedding (224 px, patch 14), class token, pre-LayerNorm,
    # visual projection; the 81-token prior with its control token
    "tiny-lambda": {
        "text_encoder": k22.TEXT_ENCODER_TINY,
        "image_encoder": k22.IMAGE_ENCODER_TINY,
        "prior": PRIOR_LAMBDA_TINY,
        "unet": k22.UNET_TINY,
        "movq": k22.MOVQ_TINY,
        "scheduler": k22.SCHEDULER_RANDOM,
        "image_processor": IMAGE_PROCESSOR_CLIP,
    },
    "full-random-lambda": {
        "text_encoder": k22.TEXT_ENCODER_BIGG,
        "image_encoder": k22.IMAGE_ENCODER_BIGG,
        "prior": PRIOR_LAMBDA,
        "unet": k22.UNET_KANDINSKY22,
        "movq": k22.MOVQ_KANDINSKY22,
        "scheduler": k22.SCHEDULER_RANDOM,
        "image_processor": IMAGE_PROCESSOR_CLIP,
    },
}

RANDOM_PRESETS = tuple(PRESETS)
REAL_PRESETS = ("lambda",)
ALL_PRESETS = RANDOM_PRESETS + REAL_PRESETS

HUB_SOURCES = {
    **k22.HUB_SOURCES,
    "prior": ("ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0", None),
    "image_processor": ("kandinsky-community/kandinsky-2-2-prior", "image_processor"),
}


def preset_configs(name: str) -> dict:
    return copy.deepcopy(PRESETS[name])
