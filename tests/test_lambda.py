"""λ-ECLIPSE (issue 19): the family, the λ prior module, the tiny export, generation with subjects
and an edge image, per-stage parity with the PyTorch λ reference, and the user's mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from eclipse_export.export.prior import LambdaEclipsePrior, expected_state_dict_shapes
from eclipse_export.families import get_family
from eclipse_export.families.kandinsky22 import presets as k22
from eclipse_export.families.lambda_eclipse import presets
from eclipse_export.families.lambda_eclipse.components import stack_dims
from eclipse_export.runtime.request import GenerationError


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_counts_are_the_published_ones():
    """stack-facts.md: prior 34,849,536, image encoder 1,844,907,264 (meta device: no memory)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    configs = presets.PRESETS["full-random-lambda"]
    with torch.device("meta"):
        prior = LambdaEclipsePrior(**configs["prior"])
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**configs["image_encoder"]))
    assert _count(prior) == 34_849_536
    assert _count(vision) == 1_844_907_264
    assert stack_dims(configs) == {"T": 77, "D": 1280, "E": 1280, "C": 4, "S": 8, "R": 224}


def test_lambda_prior_loads_the_checkpoint_layout_strictly():
    config = presets.PRIOR_LAMBDA_TINY
    shapes = expected_state_dict_shapes(config)
    assert shapes["embedding_control.weight"] == (32, 32) and shapes["positional_embedding"] == (1, 81, 32)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    result = LambdaEclipsePrior(**config).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(ValueError, match="additional_embeddings=4"):
        LambdaEclipsePrior(**k22.PRIOR_TINY)


def test_lambda_prior_token_order_and_mask():
    """81 tokens: text states, control, text_embeds, noise, prd. The control token is seen; masked
    text positions are not; the result is the prd token's projection."""
    torch.manual_seed(0)
    prior = LambdaEclipsePrior(**presets.PRIOR_LAMBDA_TINY).eval()
    d = presets.PRIOR_LAMBDA_TINY["embedding_dim"]
    noise, emb, control, hidden = torch.randn(1, d), torch.randn(1, d), torch.randn(1, d), torch.randn(1, 77, d)
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        a = prior(noise, emb, hidden, mask, control)
        hidden2 = hidden.clone()
        hidden2[:, 5:] += 10
        assert torch.allclose(a, prior(noise, emb, hidden2, mask, control), atol=1e-5)
        assert not torch.allclose(a, prior(noise, emb, hidden, mask, control + 1), atol=1e-3)
        # the same forward written out: diffusers' PriorTransformer layout with the control token
        # second after the text states (the official lambda_prior_transformer.py)
        tokens = torch.cat([prior.encoder_hidden_states_proj(hidden), prior.embedding_control(control)[:, None],
                            prior.embedding_proj(emb)[:, None], prior.proj_in(noise)[:, None],
                            prior.prd_embedding], dim=1) + prior.positional_embedding
        additive = torch.nn.functional.pad((1 - mask.float()) * -10000.0, (0, 4))[:, None] + prior.causal_attention_mask
        additive = additive.repeat_interleave(prior.config.num_attention_heads, dim=0)
        for block in prior.transformer_blocks:
            tokens = block(tokens, attention_mask=additive)
        want = prior.proj_to_clip_embeddings(prior.norm_out(tokens)[:, -1])
    torch.testing.assert_close(a, want)


def test_tiny_lambda_keeps_the_structural_features():
    tiny = presets.PRESETS["tiny-lambda"]
    vision = tiny["image_encoder"]
    assert vision["image_size"] == 224 and vision["patch_size"] == 14 and vision["projection_dim"] == tiny["prior"]["embedding_dim"]
    assert tiny["prior"]["num_embeddings"] + tiny["prior"]["additional_embeddings"] == 81
    assert get_family("lambda").required_files[-1] == "image_processor/preprocessor_config.json"
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    emb = model.vision_model.embeddings
    assert emb.patch_embedding.kernel_size == (14, 14) and emb.class_embedding.shape == (vision["hidden_size"],)
    assert hasattr(model.vision_model, "pre_layrnorm") and model.visual_projection.out_features == vision["projection_dim"]


# --- tiny bundle ------------------------------------------------------------------------------


def _images(tmp_path):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:180, 0:140]
    dog = np.stack([x, y, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(dog).save(tmp_path / "dog.png")
    hat = np.dstack([rng.integers(0, 255, (90, 120, 3), dtype=np.uint8), np.full((90, 120), 255, np.uint8)])
    hat[:, :30, 3] = 0
    Image.fromarray(hat, "RGBA").save(tmp_path / "hat.png")
    edges = np.zeros((128, 128, 3), np.uint8)
    edges[40:90, 60] = 255
    edges[40, 30:100] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    return tmp_path / "dog.png", tmp_path / "hat.png", tmp_path / "edges.png"


@pytest.fixture(scope="module")
def lambda_pipeline(tiny_lambda_bundle):
    from eclipse_export.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(tiny_lambda_bundle)


@pytest.mark.slow
def test_tiny_lambda_bundle_holds_every_component_at_fp32_parity(tiny_lambda_bundle):
    m = json.loads((tiny_lambda_bundle / "manifest.json").read_text())
    assert m["family"] == "lambda" and set(m["components"]) == set(get_family("lambda").components)
    assert m["dims"]["R"] == 224
    for name, entry in m["components"].items():
        assert entry["export_parity"]["ok"], name
        assert min(s["cosine"] for s in entry["export_parity"]["stages"]) >= 0.99999, name
    assert "negative_image_embeds.npy" in m["files"] and "image_processor/preprocessor_config.json" in m["files"]


@pytest.mark.slow
@pytest.mark.parametrize("control", ["none", "edges", "canny"])
def test_two_subjects_match_the_pytorch_reference_at_every_stage(lambda_pipeline, tmp_path, control):
    from eclipse_export.verify.compare import compare_with_reference

    dog, hat, edges = _images(tmp_path)
    if control == "canny":
        pytest.importorskip("cv2")
    kw = {"none": {}, "edges": {"control_image": edges}, "canny": {"canny_image": dog}}[control]
    gen = lambda_pipeline.generate(["a dog wearing a hat", "a hat on a hat"], subjects=[(dog, "dog"), (hat, "hat")],
                                   height=64, width=64, steps=3, seed=7, record=True, **kw)
    assert gen.images.shape == (2, 64, 64, 3)
    assert gen.warnings == ["the subject keyword 'dog' is not in the prompt (prompt 2): its image is unused"]
    report, _ = compare_with_reference(lambda_pipeline, gen)
    names = [s.stage for s in report.stages]
    assert names[2:6] == ["image_encoder.subject0", "image_encoder.subject1", "image_encoder.control",
                          "prior.text_hidden_states"]
    assert report.ok, report.table()
    assert min(s.cosine for s in report.stages) >= 0.99999 and report.image_psnr_db >= 50
    # the subjects did change the prior's input: the keyword rows are the image embeddings
    hidden = gen.intermediates["prior.text_hidden_states"]
    assert not np.allclose(hidden, gen.intermediates["text_encoder.text_hidden_states"])
    np.testing.assert_array_equal(hidden[0, 2], gen.intermediates["image_encoder.subject0"][0])  # "dog"
    if control == "none":  # the default control is the zero-image embedding
        np.testing.assert_array_equal(gen.intermediates["image_encoder.control"], lambda_pipeline.negative_image_embeds)


@pytest.mark.slow
def test_subjects_and_control_change_the_image(lambda_pipeline, tmp_path):
    dog, hat, edges = _images(tmp_path)
    kw = dict(height=64, width=64, steps=2, seed=1)
    a = lambda_pipeline.generate("a dog", subjects=[(dog, "dog")], **kw).images
    b = lambda_pipeline.generate("a dog", subjects=[(hat, "dog")], **kw).images
    c = lambda_pipeline.generate("a dog", subjects=[(dog, "dog")], control_image=edges, **kw).images
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    np.testing.assert_array_equal(a, lambda_pipeline.generate("a dog", subjects=[(dog, "dog")], **kw).images)


@pytest.mark.slow
def test_lambda_requests_that_cannot_work_are_refused(lambda_pipeline, tiny_pipeline, tmp_path):
    dog, _, edges = _images(tmp_path)
    kw = dict(height=64, width=64, steps=1)
    with pytest.raises(GenerationError, match="plain ECLIPSE.*takes no subject"):
        tiny_pipeline.generate("a dog", subjects=[(dog, "dog")], **kw)
    with pytest.raises(GenerationError, match="plain ECLIPSE.*takes no subject"):
        tiny_pipeline.generate("a dog", control_image=edges, **kw)
    with pytest.raises(GenerationError, match="give at least one subject"):
        lambda_pipeline.generate("a dog", **kw)
    with pytest.raises(GenerationError, match="no negative prompt"):
        lambda_pipeline.generate("a dog", negative_prompt="blur", subjects=[(dog, "dog")], **kw)
    with pytest.raises(GenerationError, match="tokenizes to nothing"):
        lambda_pipeline.generate("a dog", subjects=[(dog, "  ")], **kw)
    with pytest.raises(GenerationError, match="either an edge image"):
        lambda_pipeline.generate("a dog", subjects=[(dog, "dog")], control_image=edges, canny_image=dog, **kw)
    with pytest.raises(GenerationError, match=r"subject image 1 \(dog\) .*nope.png: no such file"):
        lambda_pipeline.generate("a dog", subjects=[(tmp_path / "nope.png", "dog")], **kw)
    with pytest.raises(GenerationError, match="pairs"):
        lambda_pipeline.generate("a dog", subjects="dog.png", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("case,match", [
    (["--subject", "{d}/missing.png=dog"], "missing.png: no such file"),
    (["--subject", "{d}/empty.png=dog"], "the file is empty"),
    (["--subject", "{d}/text.png=dog"], "not a readable image"),
    (["--subject", "{d}/dog.png"], "expected IMAGE=KEYWORD"),
    (["--subject", "{d}/dog.png= "], "expected IMAGE=KEYWORD"),
    (["--subject", "{d}/dog.png=dog", "--control-image", "{d}/missing.png"], "control image .*no such file"),
    ([], "give at least one subject"),
    (["--bundle-plain", "--subject", "{d}/dog.png=dog"], "takes no subject"),
])
def test_cli_bad_inputs_are_one_error_line(tiny_lambda_bundle, tiny_bundle, tmp_path, case, match):
    _images(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    bundle = tiny_bundle if "--bundle-plain" in case else tiny_lambda_bundle
    args = [a.format(d=tmp_path) for a in case if a != "--bundle-plain"]
    proc = subprocess.run([sys.executable, "-m", "eclipse_export.cli.generate", "--bundle", str(bundle),
                           "--prompt", "a dog", "--height", "64", "--width", "64", "--steps", "1",
                           "--out", str(tmp_path / "o.png"), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    import re

    assert re.search(match, errors[0]), errors[0]
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_cli_generates_with_two_subjects_and_an_edge_image(tiny_lambda_bundle, tmp_path):
    dog, hat, edges = _images(tmp_path)
    out = tmp_path / "o.png"
    proc = subprocess.run([sys.executable, "-m", "eclipse_export.cli.generate", "--bundle", str(tiny_lambda_bundle),
                           "--prompt", "a dog in a hat", "--height", "64", "--width", "64", "--steps", "2",
                           "--subject", f"{dog}=dog", "--subject", f"{hat}=hat", "--control-image", str(edges),
                           "--out", str(out), "--compare-reference"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64)
    for stage in ("image_encoder.subject0", "image_encoder.subject1", "image_encoder.control", "movq.image"):
        assert stage in proc.stdout


# the C library's λ chain: tests/test_cpp_lambda.py
