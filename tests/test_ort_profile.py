"""eclipse-bench profile: ONNX Runtime's profiler folded into per-op tables; FLOPs counted on the
nodes ORT ran agree with the exported graph's count; the CPU peak microbenchmark runs."""

from __future__ import annotations

import json

import pytest

from eclipse_export.bench import cpu_peak
from eclipse_export.bench.flops import graph_flops
from eclipse_export.bench.ort_profile import (
    component_inputs,
    node_flops,
    profile_bundle,
)
from eclipse_export.cli.bench import main


def test_node_flops_from_profiled_shapes():
    f = lambda *s: {"float": list(s)}  # noqa: E731
    # MatMul with a prepacked weight: only A is listed; K from A
    assert node_flops("MatMul", [f(2, 80, 32)], [f(2, 80, 128)]) == 2 * 2 * 80 * 128 * 32
    # FusedMatMul with A transposed (transA): A is (B, K, M)
    assert node_flops("FusedMatMul", [f(2, 64, 256)], [f(2, 256, 64)]) == 2 * 2 * 256 * 64 * 64
    # Conv with its kernel listed
    assert node_flops("Conv", [f(2, 4, 32, 32), f(8, 4, 3, 3), f(8)], [f(2, 8, 32, 32)]) == 2 * 2 * 8 * 32 * 32 * 36
    # an integer conv whose (prepacked) kernel is not listed: unknown, not zero
    assert node_flops("QLinearConv", [{"uint8": [1, 4, 8, 8]}], [{"uint8": [1, 8, 8, 8]}]) is None
    assert node_flops("Add", [f(2, 3)], [f(2, 3)]) == 0


def test_graph_flops_count_attention(tiny_bundle):
    """The attention MatMuls behind data-dependent Reshapes are counted (ONNX's own shape
    inference left them out): the prior's count equals the hand count of its structure."""
    from eclipse_export.export.sources import RandomSource

    cfg = RandomSource("tiny").configs["prior"]
    layers, width, tokens = cfg["num_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"], 80
    d = cfg["embedding_dim"]
    per_layer = 2 * tokens * (4 * width * width + 2 * 4 * width * width) + 2 * 2 * tokens * tokens * width
    text = 2 * 77 * d * width
    vectors = 2 * (2 * d * width) + 2 * width * d  # proj_in, embedding_proj; proj_to_clip_embeddings
    inputs = component_inputs("prior", json.loads((tiny_bundle / "manifest.json").read_text())["dims"], 1, 64, 64)
    assert graph_flops(tiny_bundle / "prior.onnx", {k: v.shape for k, v in inputs.items()}) == \
        layers * per_layer + text + vectors


def test_profile_of_the_tiny_bundle(tiny_bundle):
    profiles = profile_bundle(tiny_bundle, ["text_encoder", "prior", "unet"], [1], 64, 64, runs=1, warmup=0,
                              log=lambda m: None)
    by_name = {p.component: p for p in profiles}
    for p in profiles:
        assert p.wall_seconds > 0 and p.kernel_seconds > 0 and p.ops
        assert [r.seconds for r in p.ops] == sorted((r.seconds for r in p.ops), reverse=True)
        assert not any(r.unknown for r in p.ops)
    # transformer graphs: the nodes ORT ran do exactly the graph's matrix work
    assert by_name["text_encoder"].node_flops == by_name["text_encoder"].graph_flops
    assert by_name["prior"].node_flops == by_name["prior"].graph_flops
    # UNet: NCHWc convolutions pad channels to the SIMD block (conv_in has 4): a little more
    unet = by_name["unet"]
    assert unet.input_shapes["sample"][0] == 2  # CFG batch
    assert unet.graph_flops <= unet.node_flops <= 1.05 * unet.graph_flops
    # a graph already profiled in the run (same files, e.g. in a derived INT8 bundle) is skipped
    seen = set()
    assert len(profile_bundle(tiny_bundle, ["prior"], [1], 64, 64, runs=1, warmup=0, log=lambda m: None, seen=seen)) == 1
    assert profile_bundle(tiny_bundle, ["prior"], [1], 64, 64, runs=1, warmup=0, log=lambda m: None, seen=seen) == []


def test_cpu_peak_arithmetic_and_microbenchmark():
    assert cpu_peak.theoretical_peaks(2, 3.0, 64, 256) == {"fp32_gflops": 384.0, "int8_gops": 1536.0}
    micro = cpu_peak.microbench(1, repeats=1)
    if micro is None:
        pytest.skip("no C compiler or no AVX-512 VNNI here")
    assert micro["clock_ghz"] > 0.5 and micro["fp32_fma512_gflops"] > 0 and micro["int8_vnni512_gops"] > 0
    # an FMA pipe does 16 or 32 FLOP per cycle on zmm: at least one pipe's worth is measured
    assert micro["fp32_flop_per_cycle_per_core"] > 8


def test_profile_command_writes_the_table(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "profile"
    rc = main(["profile", "--bundle", str(tiny_bundle), "--out", str(out), "--component", "prior",
               "--height", "64", "--width", "64", "--runs", "1", "--quick-peak"])
    assert rc == 0
    report = json.loads((out / "profile.json").read_text())
    (entry,) = report["bundles"][tiny_bundle.name]
    assert entry["component"] == "prior" and entry["graph_gflop"] > 0 and entry["ops"]
    md = (out / "profile.md").read_text()
    assert "| bundle | graph | batch | ms per call |" in md and "MatMul" in md
    assert "ms per call" in capsys.readouterr().out


def test_profile_command_refuses_an_unknown_component(tiny_bundle, tmp_path, capsys):
    from eclipse_export.cli.common import _run

    rc = _run(main, ["profile", "--bundle", str(tiny_bundle), "--out", str(tmp_path / "p"), "--component", "vae"])
    assert rc == 2 and "unknown component" in capsys.readouterr().err
