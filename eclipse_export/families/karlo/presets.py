"""Architecture configs of ECLIPSE + Karlo (unCLIP): the published shapes and a tiny set that
keeps every structural feature of them. Torch-free: the CLI and the runtime read these cheaply.

The real configs are the published ones (shared docs, stack-facts.md "ECLIPSE for Karlo";
kakaobrain/karlo-v1-alpha in diffusers' UnCLIPPipeline layout); `full-random-karlo` builds them
with random weights, and the `karlo` source reads the checkpoint's own config files instead.
"""

from __future__ import annotations

import copy

# --- the real stack ---------------------------------------------------------------------

TEXT_ENCODER_VIT_L = {
    # kakaobrain/karlo-v1-alpha subfolder text_encoder: CLIPTextModelWithProjection ViT-L/14
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

PRIOR_ECLIPSE_KARLO = {
    # ECLIPSE-Community/ECLIPSE_Karlo_Prior (33,143,040 parameters)
    "num_attention_heads": 16,
    "attention_head_dim": 32,
    "num_layers": 10,
    "embedding_dim": 768,
    "num_embeddings": 77,
    "additional_embeddings": 3,
    "dropout": 0.0,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
}

DECODER_KARLO = {
    # karlo-v1-alpha subfolder decoder: UNet2DConditionModel, 64 px, learned variance (out 6)
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 6,
    "layers_per_block": 3,
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                         "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                       "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "block_out_channels": [320, 640, 960, 1280],
    "cross_attention_dim": 1536,
    "class_embed_type": "identity",
    "attention_head_dim": 64,
    "resnet_time_scale_shift": "scale_shift",
}

TEXT_PROJ_KARLO = {
    # karlo-v1-alpha subfolder text_proj: UnCLIPTextProjModel; time_embed_dim = 4 x the decoder's
    # first block width, the context width is the decoder's cross_attention_dim
    "clip_extra_context_tokens": 4,
    "clip_embeddings_dim": 768,
    "time_embed_dim": 1280,
    "cross_attention_dim": 1536,
}

SUPER_RES_KARLO = {
    # karlo-v1-alpha subfolders super_res_first / super_res_last: UNet2DModel, 256 px, input =
    # noise (3) concatenated with the upsampled 64 px image (3); same shape, different weights
    "sample_size": 256,
    "in_channels": 6,
    "out_channels": 3,
    "layers_per_block": 3,
    "down_block_types": ["ResnetDownsampleBlock2D"] * 4,
    "up_block_types": ["ResnetUpsampleBlock2D"] * 4,
    "block_out_channels": [320, 640, 960, 1280],
    "add_attention": False,
}

DECODER_SCHEDULER_KARLO = {
    "_class_name": "UnCLIPScheduler",
    "num_train_timesteps": 1000,
    "variance_type": "learned_range",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "beta_schedule": "squaredcos_cap_v2",
}

SUPER_RES_SCHEDULER_KARLO = {**DECODER_SCHEDULER_KARLO, "variance_type": "fixed_small_log"}

# the UnCLIPPipeline's call defaults (decoder and super-resolution steps, decoder guidance)
PIPELINE_DEFAULTS = {"decoder_steps": 25, "super_res_steps": 7, "guidance_scale": 8.0}

# --- tiny: same structure, small widths ----------------------------------------------------

TINY_WIDTH = 32

TEXT_ENCODER_TINY = {**TEXT_ENCODER_VIT_L, "hidden_size": TINY_WIDTH, "intermediate_size": 4 * TINY_WIDTH,
                     "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": TINY_WIDTH}

PRIOR_TINY = {**PRIOR_ECLIPSE_KARLO, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
              "embedding_dim": TINY_WIDTH}

DECODER_TINY = {
    # one ResnetDownsample + one SimpleCrossAttn level (added-KV attention with the padded mask),
    # class embedding "identity", scale_shift, learned variance, 16 px (the real 64 / 4)
    **DECODER_KARLO,
    "sample_size": 16,
    "layers_per_block": 1,
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "block_out_channels": [16, 32],
    "cross_attention_dim": 48,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

TEXT_PROJ_TINY = {"clip_extra_context_tokens": 4, "clip_embeddings_dim": TINY_WIDTH,
                  "time_embed_dim": 4 * DECODER_TINY["block_out_channels"][0],
                  "cross_attention_dim": DECODER_TINY["cross_attention_dim"]}

SUPER_RES_TINY = {**SUPER_RES_KARLO, "sample_size": 64, "layers_per_block": 1,
                  "down_block_types": ["ResnetDownsampleBlock2D"] * 2,
                  "up_block_types": ["ResnetUpsampleBlock2D"] * 2,
                  "block_out_channels": [16, 32], "norm_num_groups": 8}

PRESETS = {
    "tiny-karlo": {
        "text_encoder": TEXT_ENCODER_TINY, "prior": PRIOR_TINY, "text_proj": TEXT_PROJ_TINY,
        "decoder": DECODER_TINY, "super_res_first": SUPER_RES_TINY, "super_res_last": SUPER_RES_TINY,
        "decoder_scheduler": DECODER_SCHEDULER_KARLO, "super_res_scheduler": SUPER_RES_SCHEDULER_KARLO,
    },
    "full-random-karlo": {
        "text_encoder": TEXT_ENCODER_VIT_L, "prior": PRIOR_ECLIPSE_KARLO, "text_proj": TEXT_PROJ_KARLO,
        "decoder": DECODER_KARLO, "super_res_first": SUPER_RES_KARLO, "super_res_last": SUPER_RES_KARLO,
        "decoder_scheduler": DECODER_SCHEDULER_KARLO, "super_res_scheduler": SUPER_RES_SCHEDULER_KARLO,
    },
}

RANDOM_PRESETS = tuple(PRESETS)
REAL_PRESETS = ("karlo",)
ALL_PRESETS = RANDOM_PRESETS + REAL_PRESETS

# Where a real user's weights come from (hub id, subfolder); each may be a local directory laid
# out like the hub repository.
HUB_SOURCES = {
    "prior": ("ECLIPSE-Community/ECLIPSE_Karlo_Prior", None),
    "text_encoder": ("kakaobrain/karlo-v1-alpha", "text_encoder"),
    "tokenizer": ("kakaobrain/karlo-v1-alpha", "tokenizer"),
    "text_proj": ("kakaobrain/karlo-v1-alpha", "text_proj"),
    "decoder": ("kakaobrain/karlo-v1-alpha", "decoder"),
    "super_res_first": ("kakaobrain/karlo-v1-alpha", "super_res_first"),
    "super_res_last": ("kakaobrain/karlo-v1-alpha", "super_res_last"),
    "decoder_scheduler": ("kakaobrain/karlo-v1-alpha", "decoder_scheduler"),
    "super_res_scheduler": ("kakaobrain/karlo-v1-alpha", "super_res_scheduler"),
}


def preset_configs(name: str) -> dict:
    return copy.deepcopy(PRESETS[name])
