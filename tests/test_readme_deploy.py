"""README's Deploy section, run as written on the tiny preset (issue 22 #3).

Rules (stated in the section itself):
- every fenced block of the section is `sh` or `python`, optionally tagged `{install}`,
  `{copy}`, `{needs-tensorrt}` or `{needs-gpu}`; an untagged block, and `{copy}`, run here;
- `kandinsky22` -> `tiny`, `k22-` -> `tiny-`, `--height/--width N` -> 64, `--steps N` -> 2
  (`height=`/`width=`/`steps=` likewise in Python);
- the console scripts run from this checkout (`python -m eclipse_export.cli.<tool>`);
- `scp -r SRC HOST:DEST` copies SRC into a local directory standing for the board, holding the
  repository's `engines/`; every later command runs in that directory, as on the device;
- `{install}` (installs packages) and `{needs-gpu}` blocks are skipped with that reason;
  `{needs-tensorrt}` runs where TensorRT and a GPU are, else is skipped. Skipped blocks still
  have their eclipse-export / eclipse-generate flags parsed and their Python compiled, so a
  renamed flag fails here.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
TOOLS = {"eclipse-export": "eclipse_export.cli.export", "eclipse-generate": "eclipse_export.cli.generate",
         "eclipse-bench": "eclipse_export.cli.bench", "eclipse-doctor": "eclipse_export.cli.doctor"}
TAGS = {None, "install", "copy", "needs-tensorrt", "needs-gpu"}
FENCE = re.compile(r"^```(\w+)(?: \{([\w-]+)\})?\n(.*?)^```", re.S | re.M)


def deploy_blocks() -> list[tuple[str, str | None, str]]:
    text = README.read_text()
    start = text.index("\n## Deploy")
    end = text.index("\n## ", start + 1)
    return [(lang, tag, body) for lang, tag, body in FENCE.findall(text[start:end])]


def tiny(text: str) -> str:
    text = text.replace("kandinsky22", "tiny").replace("k22-", "tiny-")
    text = re.sub(r"(--(?:height|width)) \d+", r"\1 64", text)
    text = re.sub(r"(--steps) \d+", r"\1 2", text)
    text = re.sub(r"\b(height|width)=\d+", r"\1=64", text)
    return re.sub(r"\bsteps=\d+", "steps=2", text)


def commands(body: str) -> list[list[str]]:
    joined = re.sub(r"\\\n", " ", tiny(body))
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


def _have_tensorrt_and_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    from eclipse_export.export.engines import build_gpu_compute_capability

    return build_gpu_compute_capability() != "unknown"


def skip_reason(tag: str | None) -> str | None:
    if tag == "install":
        return "installs packages (this environment has them)"
    if tag == "needs-gpu":
        return "needs an NVIDIA GPU (see docs/gpu-verification.md)"
    if tag == "needs-tensorrt" and not _have_tensorrt_and_gpu():
        return "needs TensorRT and an NVIDIA GPU"
    return None


def test_the_section_has_the_steps_and_only_known_blocks():
    blocks = deploy_blocks()
    assert {lang for lang, _, _ in blocks} <= {"sh", "python"}
    assert {tag or None for _, tag, _ in blocks} <= TAGS
    text = "\n".join(body for _, _, body in blocks)
    for needed in ("--preset kandinsky22 --target onnx-fp16 --out engines/k22-onnx-fp16", "scp -r",
                   "--from-bundle engines/k22-onnx-fp16 --target trt-fp16 --static 512x512",
                   "eclipse-generate", "Pipeline.from_bundle", "eclipse-generate-cpp", "eclipse-bench"):
        assert needed in text, needed


@pytest.mark.slow
def test_the_deploy_section_runs_on_the_tiny_preset(tmp_path):
    """Workstation export -> copy -> doctor -> engine builds this machine can do, in order."""
    cwd = tmp_path / "workstation"
    cwd.mkdir()
    board = tmp_path / "orin"
    (board / "eclipse-export" / "engines").mkdir(parents=True)  # the repository on the device
    ran = []
    for lang, tag, body in deploy_blocks():
        if skip_reason(tag or None) or lang != "sh":
            continue
        for argv in commands(body):
            if argv[0] == "scp":
                assert argv[1] == "-r" and ":" in argv[3], argv
                src, dest = cwd / argv[2], board / argv[3].split(":", 1)[1]
                shutil.copytree(src, dest / src.name)
                cwd = board / "eclipse-export"
                ran.append("scp")
                continue
            assert argv[0] in TOOLS, f"unexpected command in an untagged block: {argv}"
            done = subprocess.run([sys.executable, "-m", TOOLS[argv[0]], *argv[1:]], cwd=cwd,
                                  capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stderr[-3000:]}"
            ran.append(argv[0])
    assert ran[:2] == ["eclipse-export", "scp"] and "eclipse-doctor" in ran
    assert (board / "eclipse-export" / "engines" / "tiny-onnx-fp16" / "manifest.json").is_file()
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        assert (board / "eclipse-export" / "engines" / "tiny-trt-rtx-fp16" / "manifest.json").is_file()


SKIPPED = [(i, lang, tag, body) for i, (lang, tag, body) in enumerate(deploy_blocks()) if tag in ("install", "needs-gpu", "needs-tensorrt")]


@pytest.mark.parametrize("index, lang, tag, body", SKIPPED, ids=[f"block{i}-{t}" for i, _, t, _ in SKIPPED])
def test_blocks_that_need_a_device_parse_and_say_why_they_are_skipped(index, lang, tag, body):
    from eclipse_export.cli.export import export_parser
    from eclipse_export.cli.generate import generate_parser

    if lang == "python":
        compile(tiny(body), f"README Deploy block {index}", "exec")
    else:
        parsers = {"eclipse-export": export_parser, "eclipse-generate": generate_parser}
        for argv in commands(body):
            if argv[0] in parsers:
                parsers[argv[0]]().parse_args(argv[1:])
    reason = skip_reason(tag)
    if reason:
        pytest.skip(reason)


def _github_slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (hyphens and underscores kept),
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_contents_list_and_in_page_links_point_at_headings():
    text = README.read_text()
    body = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # no headings inside code
    anchors = {_github_slug(h) for h in re.findall(r"^#{1,6} (.+)$", body, re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert len(links) >= 10, links  # the contents list
    assert links <= anchors, sorted(links - anchors)
