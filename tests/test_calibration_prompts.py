"""The project's calibration prompt set and the prompt-file loader (both formats, every error)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from eclipse_export.export.calibration_prompts import (
    DEFAULT_PROMPTS,
    PromptFileError,
    category_counts,
    load_prompts,
    take_balanced,
)

CATEGORIES = {"color", "shape", "texture", "spatial", "non_spatial", "complex"}


def test_shipped_set_covers_the_categories_with_a_held_out_split():
    prompts = load_prompts()
    assert len(prompts) >= 512
    counts = category_counts(prompts)
    assert set(counts) == CATEGORIES
    for category, by_split in counts.items():
        assert sum(by_split.values()) >= 80, category
        assert by_split.get("validation", 0) >= 10, category
    assert len(load_prompts(split="validation")) >= 100
    assert len({p.id for p in prompts}) == len(prompts)
    normalised = [re.sub(r"\s+", " ", p.prompt.lower()) for p in prompts]
    assert len(set(normalised)) == len(prompts), "duplicate prompts"
    calib = {p.prompt for p in load_prompts(split="calibration")}
    assert calib.isdisjoint(p.prompt for p in load_prompts(split="validation"))
    assert any(not p.prompt.isascii() for p in prompts)  # the tokenizer sees accents too


def test_shipped_file_is_what_the_generator_writes(tmp_path):
    """prompts.jsonl is committed; it must equal the generator's (deterministic) output."""
    script = DEFAULT_PROMPTS.with_name("make_prompts.py")
    copy = tmp_path / "make_prompts.py"
    copy.write_text(script.read_text())
    subprocess.run([sys.executable, str(copy)], check=True, capture_output=True)
    assert (tmp_path / "prompts.jsonl").read_text(encoding="utf-8") == DEFAULT_PROMPTS.read_text(encoding="utf-8")


def test_text_format(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\n\na cat on a mat\n   a dog in fog  \n#skip\n", encoding="utf-8")
    prompts = load_prompts(path)
    assert [p.prompt for p in prompts] == ["a cat on a mat", "a dog in fog"]
    assert [p.id for p in prompts] == ["line-3", "line-4"]
    assert {p.split for p in prompts} == {"calibration"} and {p.category for p in prompts} == {"user"}


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{not json}\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"prompt": "ok"}\n["a list"]\n', r"bad\.jsonl:2: .*\"prompt\" field"),
    ('{"text": "no prompt key"}\n', r"bad\.jsonl:1: .*\"prompt\" field"),
    ('{"prompt": "   "}\n', r"bad\.jsonl:1: the prompt is empty"),
    ('{"prompt": "a", "split": "train"}\n', r"bad\.jsonl:1: unknown split 'train'"),
    ("\n\n", r"holds no prompts"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError, match=message):
        load_prompts(path)


def test_other_errors(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    path = tmp_path / "only-calib.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    assert load_prompts(path)[0].split == "calibration"
    with pytest.raises(PromptFileError, match="no prompts in the 'validation' split"):
        load_prompts(path, split="validation")
    with pytest.raises(PromptFileError, match="unknown split"):
        load_prompts(path, split="test")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="cannot read"):
        load_prompts(latin1)


def test_small_counts_still_cover_every_category():
    picked = take_balanced(load_prompts(split="calibration"), 12)
    assert [p.category for p in picked[:6]] == ["color", "shape", "texture", "spatial", "non_spatial", "complex"]
    assert {p.category for p in picked[6:]} == CATEGORIES and len(picked) == 12
    assert len(take_balanced(load_prompts(split="validation"), 10_000)) == len(load_prompts(split="validation"))
