"""Architecture configs of the stack: the real Kandinsky 2.2 / ECLIPSE / bigG shapes and a tiny
set that keeps every structural feature of them.

The real configs are the published ones (see shared docs: stack-facts.md); `full-random` builds
them with random weights for cost and memory measurements, and the `kandinsky22` source reads
the checkpoint's own config files instead of these (they are only a fallback description).
Nothing here imports torch: the runtime and the CLI may read these dicts cheaply.
"""

from __future__ import annotations

import copy

# --- the real stack ---------------------------------------------------------------------

TEXT_ENCODER_BIGG = {
    # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower, loaded as CLIPTextModelWithProjection.
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1280,
    # The laion config carries the legacy ids (eos 2): transformers then pools at argmax(ids),
    # which is the eos token (49407, the largest id). Keep that behaviour.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

IMAGE_ENCODER_BIGG = {
    # kandinsky-community/kandinsky-2-2-prior subfolder image_encoder (CLIPVisionModelWithProjection).
    # Used at export time only, once, for the negative image embedding.
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_attention_heads": 16,
    "num_hidden_layers": 48,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

PRIOR_ECLIPSE = {
    # ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior (34,193,152 parameters).
    "num_attention_heads": 16,
    "attention_head_dim": 32,
    "num_layers": 10,
    "embedding_dim": 1280,
    "num_embeddings": 77,
    "additional_embeddings": 3,
    "dropout": 0.0,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
}

UNET_KANDINSKY22 = {
    # kandinsky-community/kandinsky-2-2-decoder subfolder unet (1,253,057,288 parameters).
    "in_channels": 4,
    "out_channels": 8,
    "block_out_channels": [384, 768, 1152, 1536],
    "layers_per_block": 3,
    "attention_head_dim": 64,
    "cross_attention_dim": 768,
    "encoder_hid_dim": 1280,
    "encoder_hid_dim_type": "image_proj",
    "addition_embed_type": "image",
    "addition_embed_type_num_heads": 64,
    "down_block_types": [
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "up_block_types": [
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ],
    "resnet_time_scale_shift": "scale_shift",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "class_embed_type": None,
    "sample_size": 64,
}

MOVQ_KANDINSKY22 = {
    # kandinsky-community/kandinsky-2-2-decoder subfolder movq (VQModel, spatial norm).
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": [
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "AttnDownEncoderBlock2D",
    ],
    "up_block_types": [
        "AttnUpDecoderBlock2D",
        "UpDecoderBlock2D",
        "UpDecoderBlock2D",
        "UpDecoderBlock2D",
    ],
    "block_out_channels": [128, 256, 256, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "norm_type": "spatial",
    "num_vq_embeddings": 16384,
    "vq_embed_dim": 4,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}

SCHEDULER_KANDINSKY22 = {
    # kandinsky-community/kandinsky-2-2-decoder scheduler_config.json (first revision). The real
    # source always reads the checkpoint's own file: clip_sample differs between revisions.
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "variance_type": "fixed_small",
}

# --- tiny: same structure, small widths ------------------------------------------------------

TINY_WIDTH = 32  # text hidden = projection = prior embedding = UNet encoder_hid_dim, as in the real stack

TEXT_ENCODER_TINY = {
    **TEXT_ENCODER_BIGG,
    "hidden_size": TINY_WIDTH,
    "intermediate_size": 4 * TINY_WIDTH,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": TINY_WIDTH,
}

IMAGE_ENCODER_TINY = {
    **IMAGE_ENCODER_BIGG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": TINY_WIDTH,
}

PRIOR_TINY = {
    **PRIOR_ECLIPSE,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "embedding_dim": TINY_WIDTH,
}

UNET_TINY = {
    # diffusers' own Kandinsky 2.2 test UNet: one ResnetDownsample + one SimpleCrossAttn level,
    # image_proj, "image" addition embedding and scale_shift like the real one.
    **UNET_KANDINSKY22,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "encoder_hid_dim": TINY_WIDTH,
    "addition_embed_type_num_heads": 4,
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "norm_num_groups": 8,
    "sample_size": 8,
}

MOVQ_TINY = {
    # Four levels like the real MoVQ so that the 8x latent scale (and the 64 px size rule) holds.
    **MOVQ_KANDINSKY22,
    "block_out_channels": [32, 32, 32, 64],  # SpatialNorm hard-codes 32 groups
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "num_vq_embeddings": 12,
}


# Random weights are no denoiser: without clipping, the DDPM loop drives the latents to a std of
# ~12 (tiny preset, 4 steps), far outside what MoVQ decodes, where the random decoder is chaotic:
# latents at cosine 0.99995 gave images 16 dB apart. clip_sample=True (the value in re-saved
# revisions of the real config) keeps x0 in [-1, 1], so chain parity measures the export, not
# that chaos. The real source always uses the checkpoint's own value.
SCHEDULER_RANDOM = {**SCHEDULER_KANDINSKY22, "clip_sample": True}

PRESETS = {
    "tiny": {
        "text_encoder": TEXT_ENCODER_TINY,
        "image_encoder": IMAGE_ENCODER_TINY,
        "prior": PRIOR_TINY,
        "unet": UNET_TINY,
        "movq": MOVQ_TINY,
        "scheduler": SCHEDULER_RANDOM,
    },
    "full-random": {
        "text_encoder": TEXT_ENCODER_BIGG,
        "image_encoder": IMAGE_ENCODER_BIGG,
        "prior": PRIOR_ECLIPSE,
        "unet": UNET_KANDINSKY22,
        "movq": MOVQ_KANDINSKY22,
        "scheduler": SCHEDULER_RANDOM,
    },
}

RANDOM_PRESETS = tuple(PRESETS)
REAL_PRESETS = ("kandinsky22",)
ALL_PRESETS = RANDOM_PRESETS + REAL_PRESETS

# Where a real user's weights come from (hub id, subfolder). Each may be replaced by a local
# directory laid out like the hub repository.
HUB_SOURCES = {
    "prior": ("ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior", None),
    "text_encoder": ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None),
    "tokenizer": ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None),
    "unet": ("kandinsky-community/kandinsky-2-2-decoder", "unet"),
    "movq": ("kandinsky-community/kandinsky-2-2-decoder", "movq"),
    "scheduler": ("kandinsky-community/kandinsky-2-2-decoder", "scheduler"),
    "image_encoder": ("kandinsky-community/kandinsky-2-2-prior", "image_encoder"),
}


def preset_configs(name: str) -> dict:
    """A deep copy of one random preset's configs (callers may edit it)."""
    return copy.deepcopy(PRESETS[name])
