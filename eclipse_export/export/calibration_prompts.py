"""Calibration / validation prompt files (format: calibration/README.md). Standard library only.

Two formats: `.jsonl` (one object per line: id, category, split, prompt) and anything else as
plain text, one prompt per line (blank lines and lines starting with '#' ignored; all of them
calibration prompts). Errors name the file and line, for the user to fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("calibration", "validation")
# The project's own set. It lives at the repository root (calibration/), next to its generator;
# an installed (non-editable) package does not carry it: pass --calibration-prompts there.
DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "calibration" / "prompts.jsonl"


class PromptFileError(ValueError):
    """A prompt file cannot be used (one line, names the file and line)."""


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    split: str
    prompt: str


def load_prompts(path: Path | str | None = None, split: str | None = None) -> list[Prompt]:
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    if split is not None and split not in SPLITS:
        raise PromptFileError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        hint = " (an installed package does not ship it: pass --calibration-prompts)" if path == DEFAULT_PROMPTS else ""
        raise PromptFileError(f"prompt file {path} does not exist{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"cannot read prompt file {path}: {e}") from None
    prompts = list(_parse_jsonl(path, lines) if path.suffix == ".jsonl" else _parse_text(lines))
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    if split is not None:
        prompts = [p for p in prompts if p.split == split]
        if not prompts:
            raise PromptFileError(f"{path} has no prompts in the {split!r} split")
    return prompts


def _parse_text(lines: list[str]) -> Iterable[Prompt]:
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if text and not text.startswith("#"):
            yield Prompt(f"line-{n}", "user", "calibration", text)


def _parse_jsonl(path: Path, lines: list[str]) -> Iterable[Prompt]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise PromptFileError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise PromptFileError(f"{where}: each line must be an object with a \"prompt\" field")
        text = obj["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise PromptFileError(f"{where}: the prompt is empty")
        split = obj.get("split", "calibration")
        if split not in SPLITS:
            raise PromptFileError(f"{where}: unknown split {split!r} (choose from {', '.join(SPLITS)})")
        yield Prompt(str(obj.get("id", f"line-{n}")), str(obj.get("category", "user")), split, text.strip())


def take_balanced(prompts: list[Prompt], n: int) -> list[Prompt]:
    """The first n prompts taken round-robin over categories (file order within each), so that a
    small calibration count still sees every category rather than the file's first one."""
    queues: dict[str, list[Prompt]] = {}
    for p in prompts:
        queues.setdefault(p.category, []).append(p)
    out: list[Prompt] = []
    while len(out) < n and any(queues.values()):
        for q in queues.values():
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def category_counts(prompts: Iterable[Prompt]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for p in prompts:
        by_split = out.setdefault(p.category, {})
        by_split[p.split] = by_split.get(p.split, 0) + 1
    return out
