"""The torch-free runtime chain: determinism, injected noises, and parity with the PyTorch reference."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from eclipse_export.runtime.images import save_png
from eclipse_export.runtime.noise import Noises
from eclipse_export.runtime.pipeline import GenerationError
from eclipse_export.verify.compare import compare_with_reference

PROMPT = "a red cube on a blue sphere"


def test_same_seed_same_png_bytes(tiny_pipeline, tmp_path):
    a = tiny_pipeline.generate(PROMPT, height=64, width=64, steps=4, seed=7)
    b = tiny_pipeline.generate(PROMPT, height=64, width=64, steps=4, seed=7)
    save_png(a.images[0], tmp_path / "a.png")
    save_png(b.images[0], tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    c = tiny_pipeline.generate(PROMPT, height=64, width=64, steps=4, seed=8)
    assert not np.array_equal(a.images, c.images)


def test_injected_noises_replace_the_seed(tiny_pipeline):
    a = tiny_pipeline.generate(PROMPT, height=64, width=128, steps=3, seed=1)
    b = tiny_pipeline.generate(PROMPT, height=64, width=128, steps=3, seed=999, noises=a.noises)
    assert np.array_equal(a.images, b.images)
    assert a.images.shape == (1, 64, 128, 3) and a.images.dtype == np.uint8
    bad = Noises(a.noises.prior, a.noises.latents[:, :, :4], a.noises.steps)
    with pytest.raises(ValueError, match="latents"):
        tiny_pipeline.generate(PROMPT, height=64, width=128, steps=3, noises=bad)


def test_guidance_changes_the_image_and_one_means_off(tiny_pipeline):
    base = dict(height=64, width=64, steps=3, seed=3)
    off = tiny_pipeline.generate(PROMPT, guidance_scale=1.0, record=True, **base)
    low = tiny_pipeline.generate(PROMPT, guidance_scale=0.5, **base)
    on = tiny_pipeline.generate(PROMPT, guidance_scale=4.0, record=True, **base)
    assert np.array_equal(off.images, low.images)  # <= 1: no CFG at all
    assert any("no classifier-free guidance" in w for w in low.warnings)
    assert off.intermediates["unet.noise_pred_step0"].shape[0] == 1
    assert on.intermediates["unet.noise_pred_step0"].shape[0] == 2
    assert not np.array_equal(off.images, on.images)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "no prompt"),
    (dict(prompt=["a cat", 3]), "strings"),
    (dict(negative_prompt=b"blurry"), "negative prompt must be a string"),
    (dict(height=100), "multiple of 64"),
    (dict(width=4096), "between"),
    (dict(steps=0), "steps"),
    (dict(steps=2000), "steps|num_inference_steps|timesteps"),
    (dict(guidance_scale=float("nan")), "finite"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
])
def test_bad_requests(tiny_pipeline, kwargs, message):
    args = dict(prompt=PROMPT, height=64, width=64, steps=2)
    args.update(kwargs)
    with pytest.raises(GenerationError, match=message):
        tiny_pipeline.generate(**args)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_unconditional_generation_with_a_warning(tiny_pipeline, prompt):
    """The official pipeline accepts an empty prompt; so do we, and say what it means."""
    gen = tiny_pipeline.generate(prompt, height=64, width=64, steps=2)
    assert any("prompt is empty" in w for w in gen.warnings)
    assert gen.images.shape == (1, 64, 64, 3)


def test_no_negative_prompt_and_empty_negative_prompt_differ(tiny_pipeline):
    """Official rule: None -> the bundle's zero-image embedding; any string, "" included -> the
    prior run on it, in the same batch as the prompt."""
    base = dict(height=64, width=64, steps=2, seed=5, guidance_scale=4.0, record=True)
    none = tiny_pipeline.generate(PROMPT, negative_prompt=None, **base)
    empty = tiny_pipeline.generate(PROMPT, negative_prompt="", **base)
    np.testing.assert_array_equal(none.intermediates["prior.negative_image_embeds"],
                                  tiny_pipeline.negative_image_embeds)
    assert none.noises.prior.shape[0] == 1 and empty.noises.prior.shape[0] == 2
    # "" went through the text encoder and the prior like a prompt: not the stored constant
    alone = tiny_pipeline.sessions["prior"].run({
        "noise": empty.noises.prior[1:],
        **_encode(tiny_pipeline, ""),
    })["image_embeds"]
    np.testing.assert_allclose(empty.intermediates["prior.negative_image_embeds"], alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(alone, tiny_pipeline.negative_image_embeds)
    assert not np.array_equal(none.images, empty.images)
    assert any("no effect" in w for w in tiny_pipeline.generate(PROMPT, negative_prompt="", height=64, width=64,
                                                                 steps=1, guidance_scale=1.0).warnings)


def _encode(pipeline, text: str) -> dict:
    tokens = pipeline.tokenizer([text])
    out = pipeline.sessions["text_encoder"].run({"input_ids": tokens.input_ids})
    return {"text_embeds": out["text_embeds"], "text_hidden_states": out["text_hidden_states"],
            "attention_mask": tokens.attention_mask}


def test_long_prompt_is_truncated_with_a_warning(tiny_pipeline):
    gen = tiny_pipeline.generate(" ".join(["a very long prompt"] * 40), height=64, width=64, steps=1)
    assert any("truncated" in w for w in gen.warnings)


@pytest.mark.parametrize("case", [
    dict(guidance_scale=4.0, steps=4),
    dict(guidance_scale=7.5, steps=3, negative_prompt="blurry, low quality", scheduler="ddim"),
    dict(guidance_scale=1.0, steps=2, height=128, width=64),
    dict(guidance_scale=4.0, steps=2, negative_prompt=""),  # "" is a prompt for the prior, not "none"
    dict(guidance_scale=4.0, steps=2, prompt=""),  # unconditional, accepted by both
])
def test_fp32_parity_with_pytorch_reference(tiny_bundle, case):
    """The product's promise: every stage cosine >= 0.99999 and image PSNR >= 50 dB (fp32)."""
    from eclipse_export.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_bundle(tiny_bundle)
    args = dict(prompt=PROMPT, height=64, width=64, seed=0)
    args.update(case)
    gen = pipeline.generate(record=True, **args)
    report, _ = compare_with_reference(pipeline, gen)
    assert report.ok, report.table()
    assert min(m.cosine for m in report.stages) >= 0.99999
    assert report.image_psnr_db >= 50


def test_parity_check_can_fail(tiny_pipeline):
    """A perturbed stage must be caught (the check is not vacuous)."""
    from eclipse_export.verify.compare import parity_report

    gen = tiny_pipeline.generate(PROMPT, height=64, width=64, steps=2, record=True)
    reference = {k: v.copy() for k, v in gen.intermediates.items()}
    reference["prior.image_embeds"] = reference["prior.image_embeds"] + 0.5
    reference["movq.image"] = np.clip(reference["movq.image"] + 0.05, 0, 1)
    report = parity_report(gen.intermediates, gen.images, reference, "fp32")
    assert not report.ok
    failed = {m.stage for m in report.stages if not m.ok}
    assert "prior.image_embeds" in failed and "movq.image" in failed
    assert report.image_failure is not None


def test_runtime_runs_without_torch(tiny_bundle, tmp_path):
    """The edge runtime imports no torch/transformers/diffusers, even when generating."""
    code = f"""
import sys
for name in ("torch", "transformers", "diffusers"):
    sys.modules[name] = None  # any import of them now fails
from eclipse_export.runtime.pipeline import Pipeline
from eclipse_export.runtime.images import save_png
gen = Pipeline.from_bundle({str(tiny_bundle)!r}).generate("a cat", height=64, width=64, steps=2)
save_png(gen.images[0], {str(tmp_path / 'x.png')!r})
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "x.png").stat().st_size > 0


def test_largest_graphs_load_first(tiny_bundle):
    """Graphs load largest first (a graph's transient load memory then stacks on nothing); the
    sessions keep the chain's order."""
    from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from eclipse_export.runtime.bundle import open_bundle
    from eclipse_export.runtime.pipeline import Pipeline, load_order

    bundle = open_bundle(tiny_bundle)
    order = []

    class Recording(OnnxRuntimeBackend):
        def load(self, spec, bundle):
            order.append(spec.name)
            return super().load(spec, bundle)

    pipeline = Pipeline(bundle, Recording())
    sizes = {n: sum((tiny_bundle / f).stat().st_size for f in bundle.component(n)["files"]) for n in order}
    assert order == load_order(bundle) and [sizes[n] for n in order] == sorted(sizes.values(), reverse=True)
    assert list(pipeline.sessions) == ["text_encoder", "prior", "unet", "movq"]
