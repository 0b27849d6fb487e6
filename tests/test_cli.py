"""CLI: user mistakes are one-line errors with a non-zero status and leave nothing behind."""

from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import pytest

from eclipse_export.cli.common import EXIT_USAGE, _run
from eclipse_export.cli.export import export_main
from eclipse_export.cli.generate import generate_main

from .conftest import console_script

PROMPT = "a red cube on a blue sphere"


def _generate(capsys, bundle, *extra, out=None):
    argv = ["--bundle", str(bundle), "--prompt", PROMPT, "--height", "64", "--width", "64", "--steps", "2", *extra]
    if out is not None:
        argv += ["--out", str(out)]
    rc = _run(generate_main, argv)
    return rc, capsys.readouterr()


def _one_line_error(captured) -> str:
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert "Traceback" not in captured.err
    return errors[0]


@pytest.mark.parametrize("extra, message", [
    (["--height", "100"], "multiple of 64"),
    (["--width", "8192"], "between 64 and 2048"),
    (["--steps", "0"], "steps"),
    (["--seed", "-3"], "seed"),
    (["--provider", "tpu"], "unknown provider"),
])
def test_generate_bad_input(capsys, tiny_bundle, tmp_path, extra, message):
    out = tmp_path / "x.png"
    rc, captured = _generate(capsys, tiny_bundle, *extra, out=out)
    assert rc == EXIT_USAGE
    assert message in _one_line_error(captured)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_negative_prompt_flag_keeps_none_and_empty_apart(capsys, tiny_bundle, tiny_pipeline, tmp_path):
    """--negative-prompt "" runs the prior on "" (as the official code does); no flag uses the
    bundle's zero-image embedding. Both CLI images equal the Python API's for the same request."""
    from PIL import Image

    common = ["--guidance", "4", "--seed", "3"]
    images = {}
    for name, extra, negative in (("empty", ["--negative-prompt", ""], ""), ("none", [], None)):
        rc, captured = _generate(capsys, tiny_bundle, *common, *extra, out=tmp_path / f"{name}.png")
        assert rc == 0, captured.err
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
        api = tiny_pipeline.generate(PROMPT, negative_prompt=negative, height=64, width=64, steps=2,
                                     guidance_scale=4.0, seed=3)
        np.testing.assert_array_equal(images[name], api.images[0])
    assert not np.array_equal(images["empty"], images["none"])


def test_empty_prompt_generates_with_a_warning(capsys, tiny_bundle, tmp_path):
    rc, captured = _generate(capsys, tiny_bundle, "--prompt", "", out=tmp_path / "x.png")
    assert rc == 0, captured.err
    assert "warning: the prompt is empty" in captured.err and (tmp_path / "x.png").is_file()


def test_generate_unwritable_output(capsys, tiny_bundle, tmp_path):
    rc, captured = _generate(capsys, tiny_bundle, out=tmp_path / "missing-dir" / "x.png")
    assert rc == EXIT_USAGE and "does not exist" in _one_line_error(captured)
    rc, captured = _generate(capsys, tiny_bundle, out=tmp_path / "x.jpg")
    assert rc == EXIT_USAGE and ".png" in _one_line_error(captured)
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        rc, captured = _generate(capsys, tiny_bundle, out=ro / "x.png")
        assert rc == EXIT_USAGE and "permission" in _one_line_error(captured)


def test_generate_missing_or_corrupt_bundle(capsys, tiny_bundle_copy, tmp_path):
    rc, captured = _generate(capsys, tmp_path / "nope", out=tmp_path / "x.png")
    assert rc == EXIT_USAGE and "does not exist" in _one_line_error(captured)
    (tiny_bundle_copy / "movq.onnx").write_bytes(b"garbage")
    rc, captured = _generate(capsys, tiny_bundle_copy, out=tmp_path / "x.png")
    assert rc == EXIT_USAGE and "movq.onnx" in _one_line_error(captured)
    assert not (tmp_path / "x.png").exists()


def test_generate_writes_png_and_prints_latency(capsys, tiny_bundle, tmp_path):
    out = tmp_path / "x.png"
    rc, captured = _generate(capsys, tiny_bundle, "--report", str(tmp_path / "r.json"), out=out)
    assert rc == 0, captured.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "latency: text_encoder" in captured.err and "unet_per_step" in captured.err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], "invalid choice: .huge."),
    (["--target", "trt-fp99"], "invalid choice: .trt-fp99."),
    (["--exporter", "magic"], "unknown exporter"),
    (["--preset", "tiny", "--prior", "/x"], "kandinsky22 or lambda or karlo only"),
    (["--preset", "kandinsky22", "--prior", "/definitely/not/here"], "not a directory|cannot download"),
])
def test_export_bad_input(capsys, tmp_path, argv, message):
    out = tmp_path / "b"
    rc = _run(export_main, [*argv, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == EXIT_USAGE

    assert re.search(message, _one_line_error(captured))
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_existing_output(capsys, tmp_path):
    (tmp_path / "b").mkdir()
    rc = _run(export_main, ["--out", str(tmp_path / "b")])
    assert rc == EXIT_USAGE and "--overwrite" in _one_line_error(capsys.readouterr())


def test_readme_commands_end_to_end(tmp_path):
    """The README's main job, through the installed console scripts, as a user runs it."""
    bundle, png = tmp_path / "engines" / "tiny-onnx", tmp_path / "out.png"
    export, generate = console_script("eclipse-export"), console_script("eclipse-generate")
    exp = subprocess.run([export, "--preset", "tiny", "--target", "onnx", "--out", str(bundle)],
                         capture_output=True, text=True, timeout=600)
    assert exp.returncode == 0, exp.stderr
    assert "[5/5]" in exp.stderr  # progress output
    gen = subprocess.run([generate, "--bundle", str(bundle), "--prompt", PROMPT, "--seed", "0",
                          "--out", str(png), "--compare-reference"], capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr
    assert "image (8-bit PNG) PSNR" in gen.stdout and "NO" not in gen.stdout.replace("NOTE", "")
    first = png.read_bytes()
    again = subprocess.run([generate, "--bundle", str(bundle), "--prompt", PROMPT, "--seed", "0",
                            "--out", str(png)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and png.read_bytes() == first


def test_sigterm_during_export_leaves_nothing_behind(tmp_path):
    """A SIGTERM (service manager, `kill`) mid-export unwinds like Ctrl-C: exit 130, no bundle,
    no partial directory."""
    import signal
    import time

    exe = console_script("eclipse-export")
    out = tmp_path / "bundle"
    proc = subprocess.Popen([exe, "--preset", "tiny", "--out", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".bundle.partial-*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".bundle.partial-*")), "the export never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert list(tmp_path.iterdir()) == []
