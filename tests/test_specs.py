"""Specs are complete and consistent with the presets; presets match the real architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eclipse_export.export.graphs import GRAPHS
from eclipse_export.families.kandinsky22 import presets
from eclipse_export.families.kandinsky22.components import COMPONENTS, stack_dims
from eclipse_export.families.spec import MIN_IMAGE_PSNR_DB, PRECISIONS


def test_every_component_has_a_graph_tolerances_and_sample_inputs():
    assert set(COMPONENTS) <= set(GRAPHS)  # other families' graphs too (tests/test_karlo.py)
    dims = dict(stack_dims(presets.PRESETS["tiny"]), B=2, h=8, w=16)
    for spec in COMPONENTS.values():
        for precision in PRECISIONS:
            assert spec.tolerance(precision).min_cosine >= 0.99
        sample = spec.sample_inputs(dims, np.random.default_rng(0))
        assert list(sample) == spec.input_names
        for t in spec.inputs:
            assert sample[t.name].dtype == np.dtype(t.dtype), (spec.name, t.name)
            assert sample[t.name].shape == t.resolve(dims), (spec.name, t.name)
        for symbol in {s for t in spec.inputs for s in t.dynamic_axes().values()}:
            assert symbol in spec.shape_ranges, f"{spec.name}: no shape range for {symbol}"
    for precision in PRECISIONS:
        assert precision in MIN_IMAGE_PSNR_DB


@pytest.mark.parametrize("preset", presets.RANDOM_PRESETS)
def test_preset_dims(preset):
    dims = stack_dims(presets.PRESETS[preset])
    assert dims["T"] == 77 and dims["C"] == 4 and dims["S"] == 8
    assert dims["D"] == (1280 if preset == "full-random" else presets.TINY_WIDTH)


def test_incompatible_configs_are_named():
    configs = presets.preset_configs("tiny")
    configs["unet"]["encoder_hid_dim"] = 7
    with pytest.raises(ValueError, match="unet encoder_hid_dim"):
        stack_dims(configs)


def _count(build):
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def test_full_size_configs_have_the_published_parameter_counts():
    """stack-facts.md counts, from the real configs (meta device: no memory, no time)."""
    from diffusers import UNet2DConditionModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    assert _count(lambda: UNet2DConditionModel(**presets.UNET_KANDINSKY22)) == 1_253_057_288
    assert _count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**presets.TEXT_ENCODER_BIGG))) == 694_659_840
    movq = _count(lambda: VQModel(**presets.MOVQ_KANDINSKY22))
    assert abs(movq - 67.8e6) < 0.1e6


def test_tiny_keeps_the_structural_features():
    tiny = presets.PRESETS["tiny"]
    unet = tiny["unet"]
    assert unet["encoder_hid_dim_type"] == "image_proj" and unet["addition_embed_type"] == "image"
    assert unet["resnet_time_scale_shift"] == "scale_shift" and unet["out_channels"] == 2 * unet["in_channels"]
    assert set(unet["down_block_types"]) == set(presets.UNET_KANDINSKY22["down_block_types"])
    assert set(unet["up_block_types"]) == set(presets.UNET_KANDINSKY22["up_block_types"])
    assert unet["mid_block_type"] == presets.UNET_KANDINSKY22["mid_block_type"]
    assert tiny["movq"]["norm_type"] == "spatial"
    assert len(tiny["movq"]["block_out_channels"]) == len(presets.MOVQ_KANDINSKY22["block_out_channels"])
    prior = tiny["prior"]
    assert prior["num_embeddings"] + prior["additional_embeddings"] == 80
    assert tiny["text_encoder"]["vocab_size"] == 49408 and tiny["text_encoder"]["max_position_embeddings"] == 77
