"""ECLIPSE + Karlo (issue 20): the family's specs and presets, the unCLIP scheduler and the
antialiased bicubic upsample against diffusers / torch, the tiny-karlo bundle (export parity per
graph), the torch-free chain against diffusers' UnCLIPPipeline on the same noises, and the
real-checkpoint path on local directories laid out like the hub repositories."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eclipse_export.families import FAMILIES, family_of_preset
from eclipse_export.families.karlo import components, presets
from eclipse_export.runtime.chains.karlo import KarloNoises
from eclipse_export.runtime.noise import STREAM_LATENTS, STREAM_PRIOR, standard_normal
from eclipse_export.runtime.request import GenerationError
from eclipse_export.runtime.resample import resize_bicubic_aa
from eclipse_export.runtime.schedulers import SchedulerConfigError
from eclipse_export.runtime.unclip_scheduler import UnCLIPScheduler, unclip_scheduler_from_config

# --- data: family, presets -----------------------------------------------------------------


def test_presets_belong_to_the_karlo_family():
    for preset in ("tiny-karlo", "full-random-karlo", "karlo"):
        assert family_of_preset(preset) is FAMILIES["karlo"]
    assert FAMILIES["karlo"].default_size == (256, 256)
    full = components.stack_dims(presets.PRESETS["full-random-karlo"])
    assert full == {"T": 77, "D": 768, "E": 768, "X": 4, "L": 81, "K": 1536, "M": 1280, "P": 64, "Q": 256}


def test_tiny_karlo_keeps_every_structural_feature():
    tiny = presets.PRESETS["tiny-karlo"]
    dec, sr = tiny["decoder"], tiny["super_res_first"]
    assert any(b.startswith("SimpleCrossAttn") for b in dec["down_block_types"] + dec["up_block_types"])
    assert dec["mid_block_type"] == "UNetMidBlock2DSimpleCrossAttn"
    assert dec["class_embed_type"] == "identity" and (dec["in_channels"], dec["out_channels"]) == (3, 6)
    assert tiny["text_proj"]["clip_extra_context_tokens"] == 4
    assert (sr["in_channels"], sr["out_channels"]) == (6, 3)
    assert sr["sample_size"] // dec["sample_size"] == 4  # the real 64 -> 256


def test_every_karlo_component_has_a_graph_and_fitting_sample_inputs():
    from eclipse_export.export.graphs import FAMILY_GRAPHS
    from eclipse_export.families.spec import PRECISIONS

    dims = dict(components.stack_dims(presets.PRESETS["tiny-karlo"]), B=2)
    for spec in components.COMPONENTS.values():
        assert spec.name in FAMILY_GRAPHS["karlo"]
        assert all(spec.tolerance(p).min_cosine >= 0.99 for p in PRECISIONS)
        sample = spec.sample_inputs(dims, np.random.default_rng(0))
        assert list(sample) == spec.input_names
        for t in spec.inputs:
            assert sample[t.name].dtype == np.dtype(t.dtype) and sample[t.name].shape == t.resolve(dims), t.name
        assert {s for t in spec.inputs for s in t.dynamic_axes().values()} <= set(spec.shape_ranges)


def test_incompatible_configs_are_named():
    configs = presets.preset_configs("tiny-karlo")
    configs["decoder"]["class_embed_type"] = None
    configs["text_proj"]["time_embed_dim"] = 7
    with pytest.raises(ValueError, match="time_embed_dim == decoder's.*class_embed_type == identity"):
        components.stack_dims(configs)


def test_full_random_karlo_has_the_published_parameter_counts():
    from eclipse_export.export.karlo import build

    # stack-facts.md, "ECLIPSE for Karlo"
    published = {"text_encoder": 123_650_304, "prior": 33_143_040, "text_proj": 7_878_400,
                 "decoder": 885_439_686, "super_res_first": 691_579_523, "super_res_last": 691_579_523}
    configs = presets.PRESETS["full-random-karlo"]
    for name, count in published.items():
        with torch.device("meta"):  # shapes only: no 2.4 B parameters in memory
            module = build(name, configs[name])
        assert sum(p.numel() for p in module.parameters()) == count, name


# --- the unCLIP scheduler -------------------------------------------------------------------


def _diffusers_steps(config, steps, channels, batch=2, size=8, seed=0):
    """Ours vs diffusers' UnCLIPScheduler over a whole schedule, same model outputs and noises.
    Returns (worst one-step difference from the same input, worst difference after the loop),
    both relative to the magnitude: without clip_sample x0 = (x - sqrt(1 - a) eps) / sqrt(a)
    reaches ~1e4 at t = 999 (alpha-bar ~ 1e-9), where 1e-6 absolute is below float32's resolution."""
    from diffusers import UnCLIPScheduler as Reference

    ref, ours = Reference(**config), UnCLIPScheduler(config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_array_equal(ref.timesteps.numpy(), ours.timesteps)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    x_ref = torch.from_numpy(x.copy())
    one_step = chained = 0.0

    def rel(a, b):
        return float((np.abs(a - b) / (1 + np.abs(b))).max())

    for i, t in enumerate(ours.timesteps):
        out = (2 * rng.standard_normal((batch, channels, size, size))).astype(np.float32)
        out[:, 3:] = np.tanh(out[:, 3:])  # a variance channel's range
        noise = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        last = i + 1 == len(ours.timesteps)
        draws = iter([torch.from_numpy(noise)])
        before = x_ref.numpy().copy()
        with mock.patch("diffusers.schedulers.scheduling_unclip.randn_tensor", lambda *a, _d=draws, **k: next(_d)):
            x_ref = ref.step(torch.from_numpy(out), int(t), x_ref,
                             prev_timestep=None if last else int(ref.timesteps[i + 1])).prev_sample
        one_step = max(one_step, rel(ours.step(out, int(t), before, ours.prev_timestep(i), noise), x_ref.numpy()))
        x = ours.step(out, int(t), x, ours.prev_timestep(i), noise)
        chained = max(chained, rel(x, x_ref.numpy()))
    return one_step, chained


@pytest.mark.parametrize("config,steps,channels", [
    (presets.DECODER_SCHEDULER_KARLO, 25, 6),  # the checkpoint's decoder loop
    (presets.SUPER_RES_SCHEDULER_KARLO, 7, 3),  # and its super-resolution loop
    ({**presets.DECODER_SCHEDULER_KARLO, "clip_sample": False}, 10, 6),
    ({**presets.SUPER_RES_SCHEDULER_KARLO, "prediction_type": "sample"}, 2, 3),
    (presets.SUPER_RES_SCHEDULER_KARLO, 1000, 3),  # every beta recomputed from t - 1
])
def test_unclip_scheduler_matches_diffusers_step_for_step(config, steps, channels):
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    one_step, chained = _diffusers_steps(config, steps, channels)
    assert one_step <= 1e-6
    # over a whole loop the 1-ulp differences of torch's float32 sqrt add up (1000 steps: 3e-6)
    assert chained <= (1e-6 if steps <= 25 else 1e-5)


def test_unclip_scheduler_refuses_what_it_does_not_implement():
    with pytest.raises(SchedulerConfigError, match="squaredcos_cap_v2"):
        UnCLIPScheduler({"beta_schedule": "linear"})
    with pytest.raises(SchedulerConfigError, match="variance_type='learned'"):
        UnCLIPScheduler({"variance_type": "learned"})
    with pytest.raises(SchedulerConfigError, match="UnCLIPScheduler, the config names 'DDPMScheduler'"):
        unclip_scheduler_from_config({"_class_name": "DDPMScheduler"})
    with pytest.raises(ValueError, match="steps must be between 2 and 1000"):
        UnCLIPScheduler({}).set_timesteps(1)
    sched = UnCLIPScheduler(presets.DECODER_SCHEDULER_KARLO)
    sched.set_timesteps(3)
    x = np.zeros((1, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match="variance channels"):
        sched.step(x, 999, x, 499, x)  # learned_range without the variance half
    with pytest.raises(ValueError, match="none was given"):
        sched.step(np.zeros((1, 6, 2, 2), np.float32), 999, x, 499, None)


# --- the upsample ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,size,bound", [
    ((1, 3, 64, 64), (256, 256), 1e-6),  # Karlo's
    ((2, 3, 16, 16), (64, 64), 1e-6),  # tiny-karlo's
    ((1, 2, 5, 7), (13, 29), 2e-6),  # odd factors, unequal axes
    ((1, 1, 64, 48), (20, 30), 5e-6),  # downsampling (the antialiasing widens the kernel)
])
def test_bicubic_aa_matches_torch(shape, size, bound):
    x = np.clip(np.random.default_rng(1).standard_normal(shape, dtype=np.float32), -1, 1)
    want = F.interpolate(torch.from_numpy(x), size=list(size), mode="bicubic", align_corners=False,
                         antialias=True).numpy()
    got = resize_bicubic_aa(x, *size)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= bound
    # and it is not the plain bicubic (a = -0.75): the test can tell them apart
    plain = F.interpolate(torch.from_numpy(x), size=list(size), mode="bicubic", align_corners=False).numpy()
    assert np.abs(got - plain).max() > 100 * bound


# --- noises ----------------------------------------------------------------------------------


def test_karlo_noises_use_their_own_streams():
    dims = components.stack_dims(presets.PRESETS["tiny-karlo"])
    a = KarloNoises.draw(7, 2, dims, 5, 3)
    b = KarloNoises.draw(7, 2, dims, 9, 4)
    np.testing.assert_array_equal(a.prior, standard_normal(7, STREAM_PRIOR, (2, 32)))
    np.testing.assert_array_equal(a.latents, standard_normal(7, STREAM_LATENTS, (2, 3, 16, 16)))
    # step counts change neither the initial noises nor the other loop's
    np.testing.assert_array_equal(a.sr_latents, b.sr_latents)
    np.testing.assert_array_equal(a.steps, b.steps[:5])
    np.testing.assert_array_equal(a.sr_steps, b.sr_steps[:3])
    assert not np.allclose(a.sr_latents[:, :, :16, :16], a.latents)
    with pytest.raises(ValueError, match="sr_steps"):
        a.check(2, dims, 5, 4)


# --- the tiny-karlo bundle -------------------------------------------------------------------


@pytest.fixture(scope="module")
def karlo_bundle(tmp_path_factory):
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.source_factory import make_source

    out = tmp_path_factory.mktemp("karlo") / "tiny-karlo-onnx"
    export_bundle(make_source("tiny-karlo"), out, ExportOptions(), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def karlo_pipeline(karlo_bundle):
    from eclipse_export.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(karlo_bundle)


@pytest.mark.slow
def test_tiny_karlo_exports_every_graph_with_parity(karlo_bundle):
    from eclipse_export.runtime.bundle import open_bundle

    bundle = open_bundle(karlo_bundle)
    m = bundle.manifest
    assert m["family"] == "karlo" and bundle.family is FAMILIES["karlo"]
    assert set(m["components"]) == set(FAMILIES["karlo"].components)
    for name, entry in m["components"].items():
        stages = entry["export_parity"]["stages"]
        assert len(stages) >= 2 and all(s["cosine"] >= 0.99999 for s in stages), name
    assert bundle.json("decoder_scheduler_config.json")["variance_type"] == "learned_range"
    assert bundle.json("super_res_scheduler_config.json")["variance_type"] == "fixed_small_log"
    assert "negative_image_embeds.npy" not in m["files"]
    # the text projection's graph pads the mask by the 4 extra tokens, the decoder takes it static
    assert m["components"]["decoder"]["io"]["inputs"][4]["shape"] == ["B", "L"]


@pytest.mark.slow
@pytest.mark.parametrize("prompts,guidance,steps", [("a red frog on a green leaf", 8.0, 4),
                                                    (["a cat", "two dogs in the snow"], 1.0, 3)])
def test_chain_matches_diffusers_unclip_pipeline(karlo_pipeline, prompts, guidance, steps):
    from eclipse_export.verify.compare import compare_with_reference

    gen = karlo_pipeline.generate(prompts, height=64, width=64, steps=steps, guidance_scale=guidance, seed=11,
                                  record=True)
    n = 1 if isinstance(prompts, str) else len(prompts)
    assert gen.images.shape == (n, 64, 64, 3) and gen.images.std() > 0
    report, _ = compare_with_reference(karlo_pipeline, gen)
    assert report.ok, report.table()
    assert report.image_psnr_db >= 50.0
    rows = {s.stage: s for s in report.stages}
    assert rows["decoder.noise_pred_step0"].cosine >= 0.99999
    assert rows["text_proj.encoder_hidden_states"].cosine >= 0.99999


@pytest.mark.slow
def test_requests_karlo_cannot_serve_are_refused(karlo_pipeline):
    with pytest.raises(GenerationError, match="generates 64x64 images"):
        karlo_pipeline.generate("x", height=256, width=256, steps=3)
    with pytest.raises(GenerationError, match="no negative prompt"):
        karlo_pipeline.generate("x", negative_prompt="blurry", height=64, width=64, steps=3)
    with pytest.raises(GenerationError, match="steps must be between 2"):
        karlo_pipeline.generate("x", height=64, width=64, steps=1)
    with pytest.raises(GenerationError, match="unCLIP scheduler only"):
        karlo_pipeline.generate("x", height=64, width=64, steps=3, scheduler="ddim")


@pytest.mark.slow
def test_generate_cli_takes_the_family_defaults(karlo_bundle, tmp_path, capsys):
    from PIL import Image

    from eclipse_export.cli.generate import generate_main

    out = tmp_path / "frog.png"
    report = tmp_path / "report.json"
    assert generate_main(["--bundle", str(karlo_bundle), "--prompt", "a frog", "--out", str(out),
                          "--report", str(report)]) == 0
    assert Image.open(out).size == (64, 64)
    timings = json.loads(report.read_text())["timings"]
    assert timings["decoder"] > 0 and timings["super_res"] > 0


# --- the real-checkpoint path -----------------------------------------------------------------


@pytest.mark.slow
def test_karlo_preset_loads_local_directories_in_the_unclip_layout(tmp_path):
    from eclipse_export.export.karlo import PretrainedKarloSource, RandomKarloSource
    from eclipse_export.export.source_factory import make_source, source_from_manifest
    from eclipse_export.export.sources import SourceError, state_dict_sha256
    from eclipse_export.export.tokenizer_files import write_tokenizer_files

    tiny = RandomKarloSource("tiny-karlo", seed=3)
    repo, prior_dir = tmp_path / "karlo-v1-alpha", tmp_path / "ECLIPSE_Karlo_Prior"
    tiny.load("prior").save_pretrained(prior_dir)
    for name in ("text_encoder", "text_proj", "decoder", "super_res_first", "super_res_last"):
        tiny.load(name).save_pretrained(repo / name)
    write_tokenizer_files(repo / "tokenizer", None)
    for name in ("decoder_scheduler", "super_res_scheduler"):
        (repo / name).mkdir()
        (repo / name / "scheduler_config.json").write_text(json.dumps(tiny.configs[name]))
    locations = {c: str(repo) for c in presets.HUB_SOURCES if c != "prior"} | {"prior": str(prior_dir)}
    source = make_source("karlo", locations=locations)
    assert isinstance(source, PretrainedKarloSource) and source.dims() == tiny.dims()
    for name in ("prior", "decoder", "super_res_last"):
        assert state_dict_sha256(source.load(name)) == state_dict_sha256(tiny.load(name))
    assert isinstance(source_from_manifest(source.describe()), PretrainedKarloSource)
    for f in (repo / "decoder").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(SourceError, match="pickled .bin weights"):
        make_source("karlo", locations=locations).load("decoder")


# --- other targets ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def karlo_fp16_bundle(tmp_path_factory):
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.source_factory import make_source

    out = tmp_path_factory.mktemp("karlo") / "tiny-karlo-onnx-fp16"
    export_bundle(make_source("tiny-karlo"), out, ExportOptions(target="onnx-fp16"), log=lambda m: None)
    return out


@pytest.mark.slow
def test_fp16_bundle_parity(karlo_fp16_bundle):
    from eclipse_export.runtime.bundle import open_bundle
    from eclipse_export.runtime.pipeline import Pipeline
    from eclipse_export.verify.compare import compare_with_reference

    m = open_bundle(karlo_fp16_bundle).manifest
    assert m["precision"] == "fp16"
    for name, entry in m["components"].items():  # each graph vs PyTorch FP32 (measured: >= 0.9999984)
        assert all(s["cosine"] >= 0.999 for s in entry["export_parity"]["stages"]), name
    # End to end without guidance (measured 58.7 dB at 25 steps). With guidance 8 on random weights
    # the loop multiplies FP16's differences (8 x the cond - uncond gap, divided by sqrt(alpha-bar)
    # near t = 999): 31 dB at 25 steps, 22 dB at 4-10 (docs/decisions.md); not a bound worth testing.
    pipeline = Pipeline.from_bundle(karlo_fp16_bundle)
    gen = pipeline.generate("a red frog on a green leaf", height=64, width=64, steps=6, guidance_scale=1.0, seed=3,
                            record=True)
    report, _ = compare_with_reference(pipeline, gen)
    assert report.ok, report.table()


@pytest.mark.slow
def test_trt_rtx_engines_build_from_the_fp16_bundle(karlo_fp16_bundle, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from eclipse_export.export.derive import build_engines_for_bundle
    from eclipse_export.runtime.bundle import open_bundle

    out = build_engines_for_bundle(karlo_fp16_bundle, tmp_path / "rtx", "trt-rtx-fp16", None, log=lambda m: None)
    m = open_bundle(out).manifest
    assert m["family"] == "karlo" and set(m["engines"]) == set(FAMILIES["karlo"].components)
    # the decoder's mask (with the 4 extra tokens) is a fixed dimension in the engine profile
    assert [shape[1] for shape in m["engines"]["decoder"]["profile"]["attention_mask"]] == [81, 81, 81]


# --- the C library --------------------------------------------------------------------------


@pytest.mark.slow
def test_cpp_library_generates_the_same_pixels(karlo_bundle, karlo_pipeline):
    from eclipse_export.verify.cpp import EclipseError, OrtGraphs, Runtime, load_library

    try:
        lib = load_library()
    except (OSError, FileNotFoundError) as e:
        pytest.skip(f"build/cpp is not built ({e}); make test builds it")
    graphs = OrtGraphs()  # its ctypes callbacks must outlive the library objects that call them
    rt = Runtime(lib, karlo_bundle, graphs.table)
    try:
        defaults = lib.eclipse_bundle_default_params(rt.bundle)
        assert (defaults.height, defaults.width, defaults.steps, defaults.guidance_scale) == (64, 64, 25, 8.0)
        for guidance, steps in ((8.0, 4), (1.0, 3)):
            got = rt.generate("a red frog on a green leaf", height=64, width=64, steps=steps, guidance_scale=guidance,
                              seed=5)
            want = karlo_pipeline.generate("a red frog on a green leaf", height=64, width=64, steps=steps,
                                           guidance_scale=guidance, seed=5).images[0]
            np.testing.assert_array_equal(got["image"], want)
        with pytest.raises(EclipseError, match="generates 64x64 images"):
            rt.generate("x", height=256, width=256, steps=3)
        with pytest.raises(EclipseError, match="no negative prompt"):
            rt.generate("x", negative_prompt="blurry", height=64, width=64, steps=3)
        with pytest.raises(EclipseError, match="steps must be between 2"):
            rt.generate("x", height=64, width=64, steps=1)
    finally:
        rt.close()
