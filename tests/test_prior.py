"""The ECLIPSE prior module loads the published checkpoint layout strictly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from eclipse_export.export.prior import EclipsePrior, expected_state_dict_shapes
from eclipse_export.families.kandinsky22.presets import PRIOR_ECLIPSE, PRIOR_TINY


def _checkpoint_like(config: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) for k, shape in expected_state_dict_shapes(config).items()}


def test_real_config_parameter_count():
    with torch.device("meta"):
        prior = EclipsePrior(**PRIOR_ECLIPSE)
    # stack-facts: 34,193,152 parameters (the paper rounds to 33M)
    assert sum(p.numel() for p in prior.parameters()) == 34_193_152


def test_checkpoint_state_dict_loads_strictly():
    state = _checkpoint_like(PRIOR_ECLIPSE)
    prior = EclipsePrior(**PRIOR_ECLIPSE)
    result = prior.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(prior.proj_to_clip_embeddings.weight, state["proj_to_clip_embeddings.weight"])


def test_keys_are_diffusers_prior_keys_minus_time_embedding():
    from diffusers import PriorTransformer

    small = dict(num_attention_heads=2, attention_head_dim=4, num_layers=2, embedding_dim=16)
    ours = EclipsePrior(**small).state_dict()
    theirs = PriorTransformer(**small, num_embeddings=77, additional_embeddings=4,
                              encoder_hid_proj_type="linear", added_emb_type="prd").state_dict()
    time_keys = {k for k in theirs if k.startswith(("time_embedding.", "time_proj."))}
    assert time_keys
    assert set(ours) == set(theirs) - time_keys
    for k in ours:
        if k != "positional_embedding":  # 80 tokens here, 81 with the time token
            assert ours[k].shape == theirs[k].shape, k
    assert ours["positional_embedding"].shape[1] == theirs["positional_embedding"].shape[1] - 1 == 80


def test_strict_load_rejects_a_time_conditioned_checkpoint():
    state = _checkpoint_like(PRIOR_TINY)
    state["time_embedding.linear_1.weight"] = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        EclipsePrior(**PRIOR_TINY).load_state_dict(state, strict=True)
    del state["time_embedding.linear_1.weight"], state["prd_embedding"]
    with pytest.raises(RuntimeError, match="Missing key"):
        EclipsePrior(**PRIOR_TINY).load_state_dict(state, strict=True)


def test_from_pretrained_reads_a_safetensors_checkpoint_dir(tmp_path):
    """The same path PretrainedSource takes for the hub repository's files."""
    state = _checkpoint_like(PRIOR_TINY)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "PriorTransformer", **PRIOR_TINY}))
    prior = EclipsePrior.from_pretrained(tmp_path, use_safetensors=True)
    for k, v in prior.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_mask_hides_padding_tokens():
    """Changing the text states at masked positions must not change the output."""
    torch.manual_seed(0)
    prior = EclipsePrior(**PRIOR_TINY).eval()
    d = PRIOR_TINY["embedding_dim"]
    noise, emb, hidden = torch.randn(1, d), torch.randn(1, d), torch.randn(1, 77, d)
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        a = prior(noise, emb, hidden, mask)
        hidden2 = hidden.clone()
        hidden2[:, 5:] += 10
        b = prior(noise, emb, hidden2, mask)
        hidden3 = hidden.clone()
        hidden3[:, 2] += 10
        c = prior(noise, emb, hidden3, mask)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)
