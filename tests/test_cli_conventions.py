"""Issue 22 #6: what every console script shares (--version, defaults and choices in --help,
eclipse-bench's subcommands), the random-but-printed seed, the one-line progress, and the request
stored in the PNG so that an image is reproduced from its file."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from eclipse_export import __version__
from eclipse_export.cli.common import EXIT_USAGE, _run
from eclipse_export.cli.generate import generate_main

TOOLS = {"eclipse-export": "eclipse_export.cli.export", "eclipse-generate": "eclipse_export.cli.generate",
         "eclipse-bench": "eclipse_export.cli.bench", "eclipse-doctor": "eclipse_export.cli.doctor"}


def _cli(module: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_answers_version(tool):
    done = _cli(TOOLS[tool], "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{tool} {__version__}"


def test_help_shows_choices_and_defaults():
    export = _cli(TOOLS["eclipse-export"], "--help").stdout
    from eclipse_export.families import all_presets

    assert "{" + ",".join(all_presets()) + "}" in " ".join(export.split())  # argparse wraps the usage
    assert "{onnx,onnx-fp16,onnx-int8,trt-rtx-fp16,trt-fp16,trt-int8,triton}" in export
    assert re.search(r"--opset OPSET\s+ONNX opset \(default: 17\)", export)
    assert "(default: tiny)" in export and "(default: onnx)" in export
    generate = _cli(TOOLS["eclipse-generate"], "--help").stdout
    flat = " ".join(generate.split())  # argparse wraps the help text
    assert "Kandinsky 2.2 512)" in flat and "Kandinsky 2.2 50;" in flat and "default: random" in flat


def test_export_targets_in_help_match_the_exporter():
    from eclipse_export.cli.export import TARGET_HELP
    from eclipse_export.export.options import TARGETS

    assert set(TARGET_HELP) == set(TARGETS) | {"triton"}  # triton: a serving repository (serve/), not an export


def test_bench_help_lists_its_subcommands():
    out = _cli(TOOLS["eclipse-bench"], "--help").stdout
    for sub in ("profile", "memory", "compare"):
        assert f"eclipse-bench {sub}" in out


def _generate(capsys, *argv):
    rc = _run(generate_main, list(map(str, argv)))
    return rc, capsys.readouterr()


SMALL = ["--height", "64", "--width", "64", "--steps", "2"]


def test_seed_is_random_printed_and_stored_and_the_png_reproduces_the_image(capsys, tiny_bundle, tmp_path):
    """No --seed: two runs draw different seeds, each printed; --from-png reads the request back
    and regenerates the same pixels (and the same file bytes)."""
    from PIL import Image

    from eclipse_export.runtime.images import read_png_request

    seeds = []
    for name in ("a", "b"):
        rc, captured = _generate(capsys, "--bundle", tiny_bundle, "--prompt", "a cube", "--negative-prompt", "",
                                 *SMALL, "--out", tmp_path / f"{name}.png", "--report", tmp_path / f"{name}.json")
        assert rc == 0, captured.err
        m = re.search(r"^seed (\d+) \(random; --seed \1 repeats this image\)$", captured.err, re.M)
        assert m, captured.err
        seeds.append(int(m.group(1)))
    assert seeds[0] != seeds[1]
    stored = read_png_request(tmp_path / "a.png")
    report = json.loads((tmp_path / "a.json").read_text())
    assert stored == report["request"]
    assert stored["seed"] == seeds[0] and stored["prompt"] == "a cube" and stored["negative_prompt"] == ""
    assert (stored["height"], stored["width"], stored["steps"], stored["guidance"]) == (64, 64, 2, 4.0)
    assert stored["scheduler"] == "ddpm" and len(stored["bundle"]["manifest_sha256"]) == 64

    rc, captured = _generate(capsys, "--from-png", tmp_path / "a.png", "--out", tmp_path / "again.png")
    assert rc == 0, captured.err
    assert f"seed {seeds[0]}\n" in captured.err  # given, so no "random" note
    first, again = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "again.png"))
    np.testing.assert_array_equal(first, again)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    # a flag given with --from-png overrides the stored value
    rc, captured = _generate(capsys, "--from-png", tmp_path / "a.png", "--seed", seeds[1], "--out", tmp_path / "c.png")
    assert rc == 0, captured.err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_non_latin_prompts_survive_the_png(tiny_bundle, tmp_path, capsys):
    from eclipse_export.runtime.images import read_png_request

    rc, captured = _generate(capsys, "--bundle", tiny_bundle, "--prompt", "кот в шляпе, 帽子", *SMALL, "--seed", "5",
                             "--out", tmp_path / "x.png")
    assert rc == 0, captured.err
    assert read_png_request(tmp_path / "x.png")["prompt"] == "кот в шляпе, 帽子"


def test_from_png_without_a_request_is_one_error_line(tiny_bundle, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "text.png").write_text("not a png")
    for name, message in (("plain.png", "holds no eclipse-generate request"), ("text.png", "--from-png")):
        rc, captured = _generate(capsys, "--from-png", tmp_path / name, "--out", tmp_path / "x.png")
        errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert rc == EXIT_USAGE and len(errors) == 1 and message in errors[0], captured.err
    rc, captured = _generate(capsys, "--bundle", tiny_bundle, "--out", tmp_path / "x.png")
    assert rc == EXIT_USAGE and "--prompt is required" in captured.err
    assert not (tmp_path / "x.png").exists()


def test_progress_is_one_updating_line_on_a_terminal_and_plain_lines_otherwise():
    from eclipse_export.util.progress import StepProgress

    tty = io.StringIO()
    progress = StepProgress(tty, tty=True)
    for i in range(1, 21):
        progress(i, 20)
    text = tty.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, finished once
    assert text.count("\r") == 20 and "20/20 [" + "#" * StepProgress.WIDTH + "]" in text
    assert "step/s" in text

    log = io.StringIO()
    progress = StepProgress(log, tty=False)
    for i in range(1, 101):
        progress(i, 100)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10 and lines[-1].startswith("  unet step 100/100")


def test_pipeline_from_bundle_picks_onnx_runtime_for_an_onnx_bundle(tiny_pipeline):
    """The engine-bundle half is in test_torch_free_build.py (it needs a TensorRT-RTX build)."""
    assert tiny_pipeline.backend.name.startswith("onnxruntime")
