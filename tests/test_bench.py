"""eclipse-bench: one run over the tiny bundle writes the table, JSON, Markdown and chart,
with parity against torch-fp32 in the same run; SSIM equals scikit-image's; FLOPs are right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eclipse_export.bench.flops import graph_flops
from eclipse_export.bench.report import compare_results
from eclipse_export.cli.bench import main
from eclipse_export.metrics.ssim import ssim


def test_ssim_matches_scikit_image():
    skimage = pytest.importorskip("skimage.metrics", reason="scikit-image (test extra) not installed")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    ref = np.mean([skimage.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                 data_range=255, channel_axis=-1) for x, y in zip(a, b)])
    assert abs(ssim(a, b) - ref) < 1e-9
    assert ssim(a, a) == pytest.approx(1.0)


def test_flops_of_a_known_graph(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # MatMul (B,8,16)x(16,32) + Conv 3->4 channels, 3x3, on 10x10: counted by hand
    w = helper.make_tensor("w", TensorProto.FLOAT, (16, 32), np.zeros(16 * 32, np.float32))
    k = helper.make_tensor("k", TensorProto.FLOAT, (4, 3, 3, 3), np.zeros(108, np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Conv", ["img", "k"], ["z"], pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ("B", 8, 16)),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, ("B", 3, 10, 10))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [w, k],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    flops = graph_flops(path, {"x": (2, 8, 16), "img": (2, 3, 10, 10)})
    assert flops == 2 * (2 * 8 * 32) * 16 + 2 * (2 * 4 * 10 * 10) * (3 * 3 * 3)


def test_bench_over_tiny_bundle(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "results"
    rc = main(["--bundle", str(tiny_bundle), "--out", str(out), "--height", "64", "--width", "64", "--steps", "2",
               "--runs", "2", "--warmup", "1", "--batch", "1", "--batch", "2", "--baseline-session"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    keys = set(results["targets"])
    assert {"torch-fp32/b1", "torch-fp32/b2", "onnx@cpu/b1", "onnx@cpu/b2", "onnx@cpu[ort-defaults]/b1"} <= keys
    # ONNX Runtime's default session settings (the before side) give the same numbers
    baseline = results["targets"]["onnx@cpu[ort-defaults]/b1"]
    assert baseline["parity"]["ok"] and baseline["parity"]["image_psnr_db"] == results["targets"]["onnx@cpu/b1"][
        "parity"]["image_psnr_db"]
    assert results["targets"]["onnx@cpu/b1"]["latency"]["cpu_seconds"]["p50"] > 0
    assert "skipped" in results["targets"]["torch-fp16/b1"]  # no GPU here
    onnx1 = results["targets"]["onnx@cpu/b1"]
    for stage in ("text_encoder", "prior", "unet", "movq", "total", "unet_per_step"):
        lat = onnx1["latency"][stage]
        assert lat["n"] == 2 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert onnx1["parity"]["ok"] and onnx1["parity"]["image_ssim"] > 0.99
    assert results["flops"]["1"]["unet"] > 0
    assert "onnx@cpu/b1" in captured.out and "speed-up vs torch-fp32" in captured.out
    assert (out / "results.md").read_text().startswith("# eclipse-bench results")
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert "total" in compare_results(results, results)


def test_bench_refuses_a_damaged_bundle(tiny_bundle_copy, tmp_path, capsys):
    from eclipse_export.cli.common import _run

    (tiny_bundle_copy / "prior.onnx").unlink()
    rc = _run(main, ["--bundle", str(tiny_bundle_copy), "--out", str(tmp_path / "r")])
    assert rc == 2 and "missing prior.onnx" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bench_fp32_and_fp16_bundles_in_one_run(tiny_bundle, tiny_fp16_bundle, tmp_path, capsys):
    out = tmp_path / "results"
    rc = main(["--bundle", str(tiny_bundle), "--bundle", str(tiny_fp16_bundle), "--out", str(out), "--height", "64",
               "--width", "64", "--steps", "2", "--guidance", "1.0", "--runs", "1", "--warmup", "0", "--batch", "1"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    fp16 = results["targets"]["onnx-fp16@cpu/b1"]
    assert fp16["precision"] == "fp16" and fp16["parity"]["min_image_psnr_db"] == 30.0
    assert "note" not in fp16["parity"]  # fp16 has written tolerances: enforced


def test_bench_refuses_bundles_of_different_models(tiny_bundle, tiny_bundle_copy, tmp_path, capsys):
    from eclipse_export.cli.common import _run

    path = tiny_bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["source"]["seed"] = 1
    path.write_text(json.dumps(manifest))
    rc = _run(main, ["--bundle", str(tiny_bundle), "--bundle", str(tiny_bundle_copy), "--out", str(tmp_path / "r")])
    assert rc == 2 and "another source" in capsys.readouterr().err


def test_engine_bundles_get_their_tensorrt_target(monkeypatch, tmp_path):
    """A bundle with engines adds its trt-* target, run on its TensorRT flavour; where that
    backend cannot run (no GPU here) the target is listed as skipped with the reason."""
    from eclipse_export.bench import runner as bench
    from eclipse_export.runtime.backends import factory as backends
    from eclipse_export.runtime.bundle import Bundle

    manifest = {"precision": "fp16", "target": "trt-rtx-fp16",
                "engines": {n: {"flavour": "tensorrt-rtx"} for n in ("text_encoder", "prior", "unet", "movq")}}
    monkeypatch.setattr(bench, "open_bundle", lambda path, verify_hashes=True: Bundle(tmp_path, manifest))

    def no_gpu(name, *a, **k):
        raise backends.BackendError("no usable CUDA GPU here (test)")

    monkeypatch.setattr(backends, "make_backend", no_gpu)
    targets = bench.plan_targets([tmp_path], bench.BenchConfig(), with_torch=False)
    assert [(t.name, t.meta["backend"]) for t in targets] == [("onnx-fp16@cpu", "onnxruntime"),
                                                             ("trt-rtx-fp16", "tensorrt-rtx")]
    assert targets[0].skipped is None and targets[1].skipped == "no usable CUDA GPU here (test)"
    monkeypatch.setattr(backends, "make_backend", lambda name, *a, **k: object())
    assert bench.plan_targets([tmp_path], bench.BenchConfig(), with_torch=False)[1].skipped is None


def test_int8_targets_named_by_their_rules_and_baseline_sessions(monkeypatch, tmp_path):
    """onnx-int8 bundles with TensorRT-shaped and ORT-shaped graphs in one run get distinct
    names; --baseline-session adds the ORT-defaults target of the bundles it names."""
    from eclipse_export.bench import runner as bench
    from eclipse_export.runtime.bundle import Bundle

    def manifest(rules):
        return {"precision": "int8", "target": "onnx-int8", "components": {"unet": {"quantization_rules": rules}}}

    dirs = {tmp_path / "a": manifest("ort-cpu"), tmp_path / "b": manifest("tensorrt"), tmp_path / "c": manifest("ort-cpu")}
    monkeypatch.setattr(bench, "open_bundle", lambda path, verify_hashes=True: Bundle(Path(path), dirs[Path(path)]))
    config = bench.BenchConfig(baseline_session=(str(tmp_path / "b"),))
    names = [t.name for t in bench.plan_targets(list(dirs), config, with_torch=False)]
    assert names == ["onnx-int8@cpu", "onnx-int8-trt-rules@cpu[ort-defaults]", "onnx-int8-trt-rules@cpu",
                     "onnx-int8@cpu:c"]


def test_flops_of_clip_text_encoder_at_batch_one(tiny_bundle):
    """ONNX shape inference loses the batch in CLIP's attention reshapes at batch 1; the count
    must still be half of batch 2's (the graph is linear in the batch), not a partial sum."""
    path = tiny_bundle / "text_encoder.onnx"
    one, two = graph_flops(path, {"input_ids": (1, 77)}), graph_flops(path, {"input_ids": (2, 77)})
    assert one > 0 and two == 2 * one


def test_jetson_sampling_and_clock_warning(tmp_path, monkeypatch):
    """On Jetson the run samples tegrastats and warns when jetson_clocks is off; stand-in tools
    on PATH play the board's."""
    import time

    from eclipse_export.bench import environment as bench

    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "tegrastats").write_text(
        "#!/bin/sh\nwhile true; do echo 'RAM 3012/7620MB (lfb 4x4MB) CPU [12%@1510] GR3D_FREQ 87% VDD_IN 9120mW/8000mW'; "
        "sleep 0.05; done\n")
    (tools / "jetson_clocks").write_text("#!/bin/sh\necho 'GPU MinFreq=306000000 MaxFreq=1020000000 CurrentFreq=306000000'\n")
    for f in tools.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{__import__('os').environ['PATH']}")
    assert bench.clocks_locked() is False
    assert any("jetson_clocks is off" in w for w in bench.environment()["warnings"])
    with bench.TegraStats(tmp_path, interval_ms=50) as t:
        time.sleep(0.5)
    summary = t.summary()
    assert summary["samples"] >= 2 and summary["gpu_load_peak_percent"] == 87
    assert summary["ram_peak_mb"] == 3012 and summary["board_power_peak_mw"] == 9120
    (tools / "jetson_clocks").write_text("#!/bin/sh\necho 'GPU MinFreq=1020000000 MaxFreq=1020000000'\n")
    assert bench.clocks_locked() is True
    (tools / "tegrastats").unlink()
    with bench.TegraStats(tmp_path) as t:
        pass
    assert t.summary() is None


def test_gpu_targets_and_variants_are_planned(tiny_bundle, monkeypatch):
    """--provider-set gives one ONNX Runtime target per provider list, --gpu-variants adds the
    host-loop and no-graph variants of GPU targets (not of CPU ones); a provider this machine
    lacks is skipped with the backend's reason."""
    from eclipse_export.bench import runner as bench

    config = bench.BenchConfig(provider_sets=(("cpu",), ("cuda",), ("tensorrt", "cuda")), gpu_variants=True)
    targets = {t.name: t for t in bench.plan_targets([tiny_bundle], config, with_torch=False)}
    assert list(targets) == ["onnx@cpu", "onnx@cuda", "onnx@cuda[no-graphs]", "onnx@cuda[host-loop]",
                             "onnx@tensorrt+cuda", "onnx@tensorrt+cuda[no-graphs]", "onnx@tensorrt+cuda[host-loop]"]
    assert targets["onnx@cuda[host-loop]"].meta["options"] == {"device_loop": False}
    assert targets["onnx@tensorrt+cuda"].meta["providers"] == ["tensorrt", "cuda"]
    assert targets["onnx@cpu"].skipped is None
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "no cuda provider" in targets["onnx@cuda[no-graphs]"].skipped


def test_a_target_failing_at_load_is_skipped_not_fatal(tiny_bundle, tmp_path, monkeypatch, capsys):
    from eclipse_export.bench import runner as bench
    from eclipse_export.runtime.backends.base import BackendError

    def broken(*a, **k):
        raise BackendError("TensorRT provider: libnvinfer.so.10 not found (test)")

    monkeypatch.setattr(bench, "RuntimeRunner", broken)
    rc = main(["--bundle", str(tiny_bundle), "--out", str(tmp_path / "r"), "--height", "64", "--width", "64",
               "--steps", "1", "--runs", "1", "--warmup", "0", "--batch", "1", "--no-torch"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["targets"]["onnx@cpu/b1"]["skipped"].startswith("TensorRT provider: libnvinfer")
    assert results["complete"] is True


def test_memory_per_target_in_fresh_processes(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "mem"
    assert main(["memory", "--bundle", str(tiny_bundle), "--out", str(out), "--height", "64", "--width", "64",
                 "--steps", "1"]) == 0
    (r,) = json.loads((out / "memory.json").read_text())["results"]
    files = json.loads((tiny_bundle / "manifest.json").read_text())["components"]
    assert r["graph_bytes"] == sum((tiny_bundle / f).stat().st_size for c in files.values() for f in c["files"])
    assert 0 < r["rss_after_imports"] <= r["peak_load"] <= r["peak_total"]
    assert r["peak_over_graphs"] == r["peak_total"] / r["graph_bytes"]
    assert "| onnx (tiny-onnx) |" in (out / "memory.md").read_text() and "peak / graphs" in capsys.readouterr().out
