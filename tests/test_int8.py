"""INT8: calibration capture; Q/DQ graphs shaped for ONNX Runtime's x86 integer kernels
(onnx-int8: they really run as QLinearConv/QLinearMatMul) or following TensorRT's rules
(trt-int8, or onnx-int8 --int8-rules tensorrt), from the same calibration data; the onnx-int8
target on ONNX Runtime CPU (the UNet's noise prediction within cosine 0.99 of FP32 on held-out
validation prompts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from eclipse_export.export.calibrate import (
    CaptureOptions,
    capture,
    iter_feeds,
    stratified_steps,
)

SMALL = CaptureOptions(height=64, width=64, steps=8, loop_calls_per_prompt=3)


def test_stratified_steps_cover_the_schedule():
    seen = set()
    for i in range(40):
        picks = stratified_steps(25, 4, i, seed=0)
        assert len(picks) == 4 and picks == sorted(picks) and 0 <= picks[0] and picks[-1] < 25
        # one pick per quarter of the schedule (strata 0-5, 6-11, 12-18, 19-24)
        assert [sum(p >= e for e in (6, 12, 19)) for p in picks] == [0, 1, 2, 3]
        seen.update(picks)
    assert len(seen) >= 20  # different prompts sample different steps
    assert stratified_steps(25, 4, 3, 0) == stratified_steps(25, 4, 3, 0)
    assert stratified_steps(2, 4, 0, 0) == [0, 1]


def test_capture_records_real_inputs_and_resumes(tiny_pipeline, tmp_path):
    prompts = ["a red cube", "a green glass bottle on a wooden table", "two cats"]
    logs = []
    info = capture(tiny_pipeline, prompts, tmp_path, SMALL, log=logs.append)
    assert info["captured"] == 3 and info["resumed"] == 0 and len(logs) == 3
    with np.load(tmp_path / "00001.npz") as z:
        assert str(z["prompt"]) == prompts[1]
        steps = z["calls/unet"].tolist()  # which of the UNet's calls (= steps) were kept
        assert str(z["family"]) == "kandinsky22"
        assert len(steps) == 3
        sample = z["unet/sample"]
        # the full CFG batch: [unconditional; conditional] halves share the latents
        assert sample.shape == (3, 2, 4, 8, 8)
        np.testing.assert_array_equal(sample[:, 0], sample[:, 1])
        ts = z["unet/timestep"][:, 0]
        tiny_pipeline.make_scheduler(None)
        sched = tiny_pipeline.make_scheduler(None)
        sched.set_timesteps(SMALL.steps)
        assert ts.tolist() == [float(sched.timesteps[s]) for s in steps]
        assert z["text_encoder/input_ids"].shape[0] == 1 and z["movq/latents"].shape == (1, 1, 4, 8, 8)
    # the recorded UNet input at the first step is what the chain really fed it
    gen = tiny_pipeline.generate(prompts[0], height=64, width=64, steps=8, seed=SMALL.seed, record=True)
    with np.load(tmp_path / "00000.npz") as z:
        if 0 in z["calls/unet"].tolist():
            np.testing.assert_array_equal(z["unet/sample"][0][:1], gen.noises.latents)
        np.testing.assert_array_equal(z["movq/latents"][0], gen.intermediates["unet.latents"])
    # resumable: a second run only does what is missing
    (tmp_path / "00002.npz").unlink()
    info = capture(tiny_pipeline, prompts, tmp_path, SMALL, log=lambda m: None)
    assert info["captured"] == 1 and info["resumed"] == 2
    feeds = list(iter_feeds(tmp_path, "unet"))
    assert len(feeds) == 9 and set(feeds[0]) == {"sample", "timestep", "image_embeds"}
    assert len(list(iter_feeds(tmp_path, "unet", limit=4))) == 4
    assert tiny_pipeline.sessions["unet"].__class__.__name__ != "_Recorder"  # sessions restored


@pytest.fixture(scope="module")
def tiny_int8_bundle(tmp_path_factory):
    from eclipse_export.export.options import ExportOptions, Int8Options
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.sources import RandomSource

    out = tmp_path_factory.mktemp("int8") / "tiny-onnx-int8"
    int8 = Int8Options(components=("unet", "movq"), calibration_prompts=16, validation_prompts=6,
                       capture=CaptureOptions(height=64, width=64, steps=12, loop_calls_per_prompt=4))
    export_bundle(RandomSource("tiny"), out, ExportOptions(target="onnx-int8", int8=int8), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def tiny_int8_trt_rules_bundle(tiny_bundle, tmp_path_factory):
    """onnx-int8 with TensorRT's rules (what trt-int8 builds its engines from), derived from the
    fp32 bundle; its calibration cache is what the ONNX Runtime-shaped derivation below reuses."""
    from eclipse_export.cli.export import export_main

    tmp = tmp_path_factory.mktemp("int8-trt")
    out = tmp / "derived-int8"
    assert export_main(["--from-bundle", str(tiny_bundle), "--target", "onnx-int8", "--int8-rules", "tensorrt",
                        "--out", str(out), "--calibration-count", "6", "--validation-count", "2",
                        "--calibration-steps", "4", "--calibration-size", "64x64",
                        "--calibration-cache", str(tmp / "cal")]) == 0
    return out


def test_onnx_int8_bundle_is_shaped_for_onnx_runtime(tiny_int8_bundle):
    from eclipse_export.export.quantize import check_qdq_rules, check_rules, qdq_summary

    manifest = json.loads((tiny_int8_bundle / "manifest.json").read_text())
    assert manifest["target"] == "onnx-int8" and manifest["precision"] == "int8"
    comps = manifest["components"]
    assert comps["unet"]["precision"] == "int8" and comps["movq"]["precision"] == "int8"
    assert comps["text_encoder"]["precision"] == "fp32" and comps["prior"]["precision"] == "fp32"
    for name in ("unet", "movq"):
        path = tiny_int8_bundle / comps[name]["graph"]
        assert comps[name]["quantization_rules"] == comps[name]["int8"]["rules"] == "ort-cpu"
        assert check_rules(path, "ort-cpu") == []
        assert check_qdq_rules(path)  # not a TensorRT graph: uint8, zero points, Q/DQ on outputs
        summary = qdq_summary(path)
        assert summary["quantized"]["Conv"] == summary["total"]["Conv"] > 0
        # attention's activation x activation MatMuls stay float, each with its reason
        excluded = comps[name]["int8"]["excluded"]
        assert summary["quantized"]["MatMul"] == summary["total"]["MatMul"] - len(excluded)
        if name == "unet":
            assert excluded and all("attention" in why for why in excluded.values())
        assert comps[name]["int8"]["samples"] > 0
        assert comps[name]["calibration"]["captured"] == 16
    # the UNet's noise prediction against its FP32 graph on held-out validation inputs
    unet_parity = comps["unet"]["int8_parity"]
    assert unet_parity["ok"] and min(s["cosine"] for s in unet_parity["stages"]) >= 0.99
    assert len(unet_parity["stages"]) == 6 * 4  # every validation prompt, every captured step


def test_qdq_rule_checker_catches_violations(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from eclipse_export.export.quantize import check_qdq_rules

    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(3, np.int8), "zp")
    uzp = numpy_helper.from_array(np.array(0, np.uint8), "uzp")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q1"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq1"),
        helper.make_node("Relu", ["dq"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "s", "uzp"], ["q2"], name="q2"),
        helper.make_node("DequantizeLinear", ["q2", "s", "uzp"], ["y"], name="dq2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [scale, zp, uzp])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), str(path))
    problems = " | ".join(check_qdq_rules(path))
    assert "dq1 feeds Relu" in problems and "zero point is not 0" in problems and "uint8" in problems


def test_onnx_int8_chain_runs_and_reports_every_stage(tiny_int8_bundle):
    from eclipse_export.runtime.pipeline import Pipeline
    from eclipse_export.verify.compare import compare_with_reference

    pipeline = Pipeline.from_bundle(tiny_int8_bundle)
    gen = pipeline.generate("a red cube on a blue sphere", height=64, width=64, steps=4, seed=0, record=True)
    report, _ = compare_with_reference(pipeline, gen)
    stages = {m.stage for m in report.stages}
    assert {"text_encoder.text_embeds", "prior.image_embeds", "unet.noise_pred_step0", "movq.image"} <= stages
    assert all(m.finite for m in report.stages)
    assert report.precision == "int8"


needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx is not installed")


def test_onnx_runtime_runs_the_int8_graphs_as_integer_kernels(tiny_int8_bundle, tiny_int8_trt_rules_bundle):
    """ONNX Runtime's profiler on both UNet graphs: the ORT-shaped one runs every convolution
    as QLinearConv and every quantized MatMul as QLinearMatMul; the TensorRT-shaped one runs
    float Convs behind DequantizeLinear (why it was slower than FP32 on CPU, issue 13)."""
    from eclipse_export.bench.ort_profile import profile_bundle

    (ort_unet,) = profile_bundle(tiny_int8_bundle, ["unet"], [1], 64, 64, runs=1, warmup=0, log=lambda m: None)
    ops = {r.op: r for r in ort_unet.ops}
    manifest = json.loads((tiny_int8_bundle / "manifest.json").read_text())["components"]["unet"]["int8"]
    assert "Conv" not in ops and ops["QLinearConv"].nodes == manifest["total"]["Conv"]
    assert ops["QLinearMatMul"].nodes == manifest["quantized"]["MatMul"]
    assert ops["QLinearConv"].flops > 0 and not ops["QLinearConv"].unknown
    (trt_unet,) = profile_bundle(tiny_int8_trt_rules_bundle, ["unet"], [1], 64, 64, runs=1, warmup=0,
                                 log=lambda m: None)
    trt_ops = {r.op for r in trt_unet.ops}
    assert "Conv" in trt_ops and "QLinearConv" not in trt_ops and "DequantizeLinear" in trt_ops


def test_trt_int8_refuses_graphs_shaped_for_onnx_runtime(tiny_int8_bundle, tmp_path, capsys):
    from eclipse_export.cli.common import _run
    from eclipse_export.cli.export import export_main

    rc = _run(export_main, ["--from-bundle", str(tiny_int8_bundle), "--target", "trt-int8", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "not TensorRT" in err and "--target trt-int8" in err
    assert not (tmp_path / "e").exists()


@needs_rtx
def test_tensorrt_rtx_parser_accepts_the_qdq_graphs(tiny_int8_trt_rules_bundle):
    """TensorRT-RTX runs INT8 only as weight-only GEMM, but its ONNX parser takes Q/DQ graphs:
    proof that the graphs import into the TensorRT family."""
    import tensorrt_rtx as trt

    manifest = json.loads((tiny_int8_trt_rules_bundle / "manifest.json").read_text())
    logger = trt.Logger(trt.Logger.ERROR)
    for name in ("unet",):
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(str(tiny_int8_trt_rules_bundle / manifest["components"][name]["graph"]))
        assert ok, [str(parser.get_error(i)) for i in range(parser.num_errors)]
        layer_types = {str(network.get_layer(i).type) for i in range(network.num_layers)}
        assert "LayerType.QUANTIZE" in layer_types and "LayerType.DEQUANTIZE" in layer_types


def test_int8_bundle_derived_from_an_fp32_bundle(tiny_bundle, tiny_int8_trt_rules_bundle, tmp_path):
    """--from-bundle: quantize a shipped fp32 bundle without re-exporting; the source is untouched;
    both rule sets come from the same calibration data (the second derivation captures nothing)."""
    from eclipse_export.export.quantize import check_qdq_rules
    from eclipse_export.runtime.bundle import open_bundle

    derived = open_bundle(tiny_int8_trt_rules_bundle)  # every file verified against the new manifest
    assert derived.manifest["target"] == "onnx-int8" and derived.component("unet")["precision"] == "int8"
    assert derived.manifest["derived_from"] == str(tiny_bundle)
    assert derived.component("unet")["quantization_rules"] == "tensorrt"
    assert check_qdq_rules(derived.graph_path("unet")) == []
    # resumable, and the same calibration data: the ORT-shaped derivation finds every shard in the cache
    logs = []
    from eclipse_export.export.calibrate import CaptureOptions
    from eclipse_export.export.options import Int8Options
    from eclipse_export.export.derive import build_engines_for_bundle

    before = open_bundle(tiny_bundle).manifest["files"]
    cache = tiny_int8_trt_rules_bundle.parent / "cal"
    build_engines_for_bundle(tiny_bundle, tmp_path / "again", "onnx-int8", None, overwrite=False, log=logs.append,
                             int8=Int8Options(calibration_prompts=6, validation_prompts=2, cache_dir=cache,
                                              capture=CaptureOptions(height=64, width=64, steps=4)))
    assert not any(line.strip().startswith("calibration 1/") for line in logs)
    again = open_bundle(tmp_path / "again")
    assert again.component("unet")["quantization_rules"] == "ort-cpu"
    cal, cal_before = again.component("unet")["calibration"], derived.component("unet")["calibration"]
    assert cal["captured"] == 0 and cal["resumed"] == cal_before["captured"] == 6
    assert cal["options"] == cal_before["options"]
    assert open_bundle(tiny_bundle).manifest["files"] == before


@pytest.mark.parametrize("failure", [RuntimeError("simulated quantizer failure"), KeyboardInterrupt()])
def test_failed_or_interrupted_int8_derivation_leaves_no_bundle(tiny_bundle, tmp_path, monkeypatch, failure):
    """--from-bundle quantization that fails (or is interrupted) half-way: no output bundle, no
    partial directory; complete calibration shards stay in the cache for the next run."""
    import eclipse_export.export.quantize as quantize_mod
    from eclipse_export.export.options import Int8Options
    from eclipse_export.export.derive import build_engines_for_bundle

    def boom(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"half a graph")
        raise failure

    monkeypatch.setattr(quantize_mod, "quantize_graph", boom)
    out, cache = tmp_path / "out" / "int8", tmp_path / "cal"
    out.parent.mkdir()
    with pytest.raises(type(failure)):
        build_engines_for_bundle(tiny_bundle, out, "onnx-int8", None, log=lambda m: None,
                                 int8=Int8Options(calibration_prompts=2, validation_prompts=1, cache_dir=cache,
                                                  capture=CaptureOptions(height=64, width=64, steps=2)))
    assert list(out.parent.iterdir()) == []
    shards = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert shards and all(not name.startswith(".") for name in shards), shards  # no temporary shard files


def test_failed_capture_keeps_complete_shards_only(tiny_pipeline, tmp_path, monkeypatch):
    """A capture that dies mid-prompt (or mid-write) leaves the shards that were complete and no
    temporary file; the export that ran it leaves no bundle (see the derivation test above)."""
    import eclipse_export.export.calibrate as calibrate_mod

    real_savez, calls = np.savez, []

    def savez_then_die(path, **arrays):
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as f:
                f.write(b"PK half a zip")
            raise OSError("simulated disk full")
        real_savez(path, **arrays)

    monkeypatch.setattr(calibrate_mod.np, "savez", savez_then_die)
    with pytest.raises(OSError, match="disk full"):
        capture(tiny_pipeline, ["a", "b", "c", "d"], tmp_path, SMALL, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.npz", "00001.npz"]
    monkeypatch.setattr(calibrate_mod.np, "savez", real_savez)
    info = capture(tiny_pipeline, ["a", "b", "c", "d"], tmp_path, SMALL, log=lambda m: None)
    assert info["resumed"] == 2 and info["captured"] == 2


def test_rule_checks_read_zero_points_stored_as_external_data(tmp_path):
    """The quantizer writes large per-channel zero points to the external data file (full-size
    UNet); the checks must read them there, not fail (seen at full size only)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from eclipse_export.export.onnx_io import save_external
    from eclipse_export.export.quantize import check_rules, qdq_summary

    n = 1024  # 1 KB of int8 zero points: at the inline threshold, so stored externally
    w = numpy_helper.from_array(np.ones((n, 8, 1, 1), np.int8), "w")
    inits = [w, numpy_helper.from_array(np.full(n, 0.1, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
             numpy_helper.from_array(np.ones(n, np.int32), "b"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "bs"),
             numpy_helper.from_array(np.zeros(n, np.int32), "bz"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(7, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["y"], name="conv"),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 8, 4, 4))],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, (1, n, 4, 4))], inits)
    path = tmp_path / "q.onnx"
    save_external(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    stored = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert stored["wz"].data_location == TensorProto.EXTERNAL
    assert check_rules(path, "ort-cpu") == []
    assert qdq_summary(path)["nonzero_zero_points"] == 4  # the activations' Q and DQ nodes (zero point 7)
    assert any("zero point is not 0" in p for p in check_rules(path, "tensorrt"))


def test_exported_graphs_hold_standard_onnx_ops_only(tiny_bundle, tiny_int8_bundle, tiny_int8_trt_rules_bundle):
    """No fusion with ONNX Runtime's own ops (com.microsoft) is written into a bundle: every graph
    stays a valid TensorRT input (ORT fuses at session creation); engine builds refuse otherwise."""
    from eclipse_export.export.derive import non_standard_ops

    for bundle in (tiny_bundle, tiny_int8_bundle, tiny_int8_trt_rules_bundle):
        manifest = json.loads((bundle / "manifest.json").read_text())
        for entry in manifest["components"].values():
            assert non_standard_ops(bundle / entry["graph"]) == []


def test_external_data_readers_equal_onnx_on_the_int8_graphs(tiny_int8_bundle, tiny_int8_trt_rules_bundle, tmp_path):
    """The runtime's external-data readers (Python and C++, issue 23) on every quantized graph,
    including zero points stored as external data."""
    from onnx import TensorProto, helper, numpy_helper

    from eclipse_export.export.onnx_io import save_external

    from .test_onnx_refs import assert_readers_equal_onnx, bundle_graphs

    assert_readers_equal_onnx(bundle_graphs(tiny_int8_bundle) + bundle_graphs(tiny_int8_trt_rules_bundle))
    w = numpy_helper.from_array(np.arange(2048, dtype=np.int8).reshape(2, 1024), "w")
    zero = numpy_helper.from_array(np.zeros(2048, np.int8).reshape(2, 1024), "wz")
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["w", "s", "wz"], ["y"], axis=0)], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1024])],
                              [w, zero, numpy_helper.from_array(np.ones(2, np.float32), "s")])
    save_external(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "q.onnx")
    assert assert_readers_equal_onnx([tmp_path / "q.onnx"]) == 2
