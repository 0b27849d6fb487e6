"""Issue 22 #5: eclipse-bench as a device user runs it: chosen targets, batches that follow the
engines' profile, a failing exit when a requested target is skipped, device defaults in --help,
"n/a" parity without a reference, and a table that fits an 80-column terminal."""

from __future__ import annotations

import json

import pytest

from eclipse_export.bench import report as bench_report
from eclipse_export.bench import runner as bench
from eclipse_export.cli.bench import main
from eclipse_export.cli.common import EXIT_USAGE, _run

SMALL = ["--height", "64", "--width", "64", "--steps", "1", "--runs", "1", "--warmup", "0", "--batch", "1"]


def _engines(max_prompts: int) -> dict:
    from eclipse_export.families.kandinsky22.components import COMPONENTS

    return {name: {"flavour": "tensorrt", "profile": {
        spec.inputs[0].name: [[1], [spec.rows_per_prompt], [max_prompts * spec.rows_per_prompt]]}}
        for name, spec in COMPONENTS.items()}


def test_batches_follow_the_engines_profile(monkeypatch, tmp_path):
    from eclipse_export.runtime.bundle import Bundle

    assert bench.engine_max_batch({"engines": _engines(1)}) == 1
    assert bench.engine_max_batch({"engines": _engines(4)}) == 4
    assert bench.engine_max_batch({}) is None
    manifests = {"one": {"engines": _engines(1)}, "four": {"engines": _engines(4)}, "onnx": {}}
    monkeypatch.setattr(bench, "open_bundle", lambda p, verify_hashes=True: Bundle(tmp_path, manifests[str(p)]))
    assert bench.default_batches(["onnx"]) == (1, 2)
    assert bench.default_batches(["four", "onnx"]) == (1, 2)
    assert bench.default_batches(["one", "onnx"]) == (1,)  # no b2 row that could only be skipped


def test_requested_provider_sets():
    assert bench.requested_provider_sets(["trt-fp16", "onnx-fp16@cuda", "onnx@tensorrt+cuda:b", "onnx@cuda"]) == \
        (("cuda",), ("tensorrt", "cuda"))


def test_only_the_chosen_targets_run(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["--bundle", str(tiny_bundle), "--out", str(out), *SMALL, "--no-torch", "--targets", "onnx@cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["targets"]) == ["onnx@cpu/b1"]
    table = capsys.readouterr().out
    assert "n/a" in table and "ref" not in table  # --no-torch: nothing to compare with


def test_an_unknown_target_is_one_error_line(tiny_bundle, tmp_path, capsys):
    rc = _run(main, ["--bundle", str(tiny_bundle), "--out", str(tmp_path / "r"), *SMALL, "--no-torch",
                     "--targets", "trt-fp16"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "--targets trt-fp16: not a target of these bundles" in err and "onnx@cpu" in err


def test_a_requested_target_that_is_skipped_fails_the_run(tiny_bundle, tmp_path, capsys, monkeypatch):
    """onnx@cuda on a machine without the CUDA provider: listed as skipped, and the exit status says
    the run did not measure what was asked; without --targets the same skip is not a failure
    unless --strict."""
    from eclipse_export.runtime.backends import factory

    real = factory.make_backend

    def no_cuda(name, providers=("cpu",), *a, **k):
        if "cuda" in providers:
            raise factory.BackendError("the CUDA provider is not available here (test)")
        return real(name, providers, *a, **k)

    monkeypatch.setattr(factory, "make_backend", no_cuda)
    common = ["--bundle", str(tiny_bundle), *SMALL, "--no-torch"]
    assert main([*common, "--out", str(tmp_path / "a"), "--targets", "onnx@cpu,onnx@cuda"]) == 1
    assert "requested target(s) skipped: onnx@cuda/b1" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b"), "--provider-set", "cpu", "--provider-set", "cuda"]) == 0
    assert main([*common, "--out", str(tmp_path / "c"), "--provider-set", "cpu", "--provider-set", "cuda",
                 "--strict"]) == 1


def test_help_prints_the_device_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "(default: 512)" in out and "(default: 20)" in out
    assert (bench.BenchConfig.height, bench.BenchConfig.steps) == (512, 20)


RESULTS = {"targets": {
    "torch-fp32/b1": {"target": "torch-fp32", "latency": {s: {"p50": 0.1} for s in (*bench_report.STAGES, "total",
                      "unet_per_step")} | {"images_per_second": 10.0}, "load_seconds": 1.0, "peak_host_bytes": 2**30},
    "onnx-fp16@cuda/b1": {"target": "onnx-fp16@cuda", "skipped": "the CUDA provider is not available here: " + "x " * 60},
}}
RESULTS["targets"]["trt-fp16/b1"] = dict(RESULTS["targets"]["torch-fp32/b1"], target="trt-fp16")


def test_table_fits_80_columns_or_shows_the_chosen_columns():
    full = bench_report.table(RESULTS)
    assert max(map(len, full.splitlines())) > 150
    narrow = bench_report.table(RESULTS, width=80)
    assert max(map(len, narrow.splitlines())) <= 80
    assert "total p50 s" in narrow and "cos min" in narrow and "text_encoder p50 ms" not in narrow
    picked = bench_report.table(RESULTS, columns=("unet", "img/s"))
    assert picked.splitlines()[0].split() == ["target/batch", "unet", "p50", "ms", "img/s"]
    rows = {line.split()[0]: line.split() for line in full.splitlines()[2:] if not line.startswith(" ")}
    assert rows["torch-fp32/b1"][-2:] == ["ref", "ref"] and rows["trt-fp16/b1"][-2:] == ["n/a", "n/a"]


def test_the_shared_cores_note_only_when_the_load_is_above_the_core_count():
    busy = {"cpu_count": 2, "loadavg_at_start": [3.5, 1, 1], "loadavg_at_end": [1.0, 1, 1]}
    quiet = {"cpu_count": 16, "loadavg_at_start": [3.5, 1, 1], "loadavg_at_end": [1.0, 1, 1]}
    assert "above the core count" in bench_report._load_note(busy)
    assert bench_report._load_note(quiet) == "" and bench_report._load_note({}) == ""
