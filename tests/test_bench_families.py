"""eclipse-bench on the other model families (issues 19 and 20): what is timed and compared is the
bundle's family's data. λ-ECLIPSE: the image encoder's latency per subject image and its parity
per subject; Karlo: text_proj, the decoder loop, the upsample and the super-resolution loop,
against diffusers' UnCLIPPipeline."""

from __future__ import annotations

import json

import pytest

from eclipse_export.cli.bench import main
from eclipse_export.families import get_family


def test_the_families_say_what_is_timed():
    assert get_family("kandinsky22").timed_stages == ("text_encoder", "prior", "unet", "movq")
    assert get_family("kandinsky22").per_step_timing == "unet_per_step"
    assert get_family("lambda").timed_stages == ("text_encoder", "image_encoder", "prior", "unet", "movq")
    karlo = get_family("karlo")
    assert karlo.timed_stages == ("text_encoder", "prior", "text_proj", "decoder", "upsample", "super_res")
    assert karlo.per_step_timing == "decoder_per_step"
    assert [f.takes_subjects for f in map(get_family, ("kandinsky22", "lambda", "karlo"))] == [False, True, False]


def test_per_subject_timings_follow_their_stage():
    from eclipse_export.bench.runner import timing_keys

    timings = {"text_encoder": 1, "image_encoder": 1, "image_encoder.subject10": 1, "image_encoder.subject2": 1,
               "image_encoder.control": 1, "prior": 1, "unet": 1, "unet_per_step": 1, "movq": 1, "total": 1}
    keys = timing_keys(timings, get_family("lambda").timed_stages, "unet_per_step")
    assert keys[5:] == ["total", "unet_per_step", "image_encoder.control", "image_encoder.subject2",
                        "image_encoder.subject10"]


@pytest.mark.slow
def test_bench_over_tiny_lambda(tiny_lambda_bundle, tmp_path, capsys):
    out = tmp_path / "results"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sphere on a cube\n")
    rc = main(["--bundle", str(tiny_lambda_bundle), "--out", str(out), "--height", "64", "--width", "64",
               "--steps", "2", "--runs", "1", "--warmup", "1", "--batch", "1", "--quality-prompts", str(prompts)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["family"] == "lambda" and results["complete"]
    # the default subjects are drawn by the project and kept with the results
    assert [k for _, k in results["config"]["subjects"]] == ["cube", "sphere"]
    assert (out / "subjects" / "cube.png").is_file()
    for target in ("torch-fp32/b1", "onnx@cpu/b1"):
        lat = results["targets"][target]["latency"]
        for key in ("image_encoder", "image_encoder.subject0", "image_encoder.subject1", "unet_per_step"):
            assert lat[key]["n"] == 1 and lat[key]["p50"] > 0, (target, key)
        assert "image_encoder.control" not in lat  # no edge map: the zero-image embedding, no encoder call
    parity = results["targets"]["onnx@cpu/b1"]["parity"]
    stages = [s["stage"] for s in parity["stages"]]
    assert stages[2:5] == ["image_encoder.subject0", "image_encoder.subject1", "image_encoder.control"]
    assert parity["ok"] and (parity["image_psnr_db"] == "inf" or parity["image_psnr_db"] >= 50)
    assert min(s["cosine"] for s in parity["stages"]) >= 0.99999
    quality = results["quality"]["onnx@cpu"]  # the subjects go with every prompt of the set
    assert quality["ok"] and quality["stages"]["image_encoder.subject1"]["cosine_min"] >= 0.99999
    md = (out / "results.md").read_text()
    assert "image_encoder p50 ms" in md and "image_encoder.subject1" in md and "'sphere' (sphere.png)" in md
    assert "- onnx@cpu/b1: text_encoder.text_embeds 1.0000" in md  # the parity section, stage by stage
    assert "image_encoder.subject0" in captured.out


def test_subjects_are_refused_for_a_bundle_without_an_image_encoder(tiny_bundle, tmp_path, capsys):
    from eclipse_export.cli.common import _run

    rc = _run(main, ["--bundle", str(tiny_bundle), "--out", str(tmp_path / "r"), "--subject", "x.png=cube"])
    assert rc == 2 and "takes no subject images" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def tiny_karlo_bundle(tmp_path_factory):
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.source_factory import make_source

    out = tmp_path_factory.mktemp("karlo") / "tiny-karlo-onnx"
    export_bundle(make_source("tiny-karlo"), out, ExportOptions(), log=lambda m: None)
    return out


@pytest.mark.slow
def test_bench_over_tiny_karlo(tiny_karlo_bundle, tmp_path, capsys):
    out = tmp_path / "results"
    # no --height/--width: the bundle's own size (its super-resolution UNets'); the reference
    # loaded per run (--reference-low-memory) gives the same numbers
    rc = main(["--bundle", str(tiny_karlo_bundle), "--out", str(out), "--steps", "2", "--runs", "1",
               "--warmup", "1", "--batch", "1", "--columns", "decoder,super_res,step,cos,psnr",
               "--reference-low-memory"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["family"] == "karlo" and results["config"]["height"] == 64
    for target in ("torch-fp32/b1", "onnx@cpu/b1"):
        lat = results["targets"][target]["latency"]
        for key in ("text_encoder", "prior", "text_proj", "decoder", "upsample", "super_res", "decoder_per_step"):
            assert lat[key]["n"] == 1 and lat[key]["p50"] > 0, (target, key)
        assert lat["total"]["p50"] >= lat["decoder"]["p50"] + lat["super_res"]["p50"]
    parity = results["targets"]["onnx@cpu/b1"]["parity"]
    assert [s["stage"] for s in parity["stages"]][-1] == "super_res.image"
    assert parity["ok"] and min(s["cosine"] for s in parity["stages"]) >= 0.99999
    assert "torch-fp16/b1" in results["targets"] and "skipped" in results["targets"]["torch-fp16/b1"]
    assert captured.out.splitlines()[0].split()[:4] == ["target/batch", "decoder", "p50", "ms"]
    assert "FLOPs not counted: FLOPs are counted for Kandinsky 2.2 bundles only" in captured.err
