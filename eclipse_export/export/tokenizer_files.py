"""Tokenizer files for a bundle (export time; uses transformers).

The real stack's tokenizer comes from the laion bigG repository. The random presets use the
same CLIP BPE vocabulary, rebuilt offline from the merges file that open_clip ships, so tests
tokenise exactly like the real model. Either way the bundle gets transformers' saved files,
including `tokenizer.json`, which the edge runtime reads with the `tokenizers` library alone.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary: 256 byte symbols, the same with "</w>", 48894 merges, 2 special tokens.
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
MAX_LENGTH = 77
PAD_ID, BOS_ID, EOS_ID = 0, 49406, 49407  # pad is "!", as in the laion bigG tokenizer


class TokenizerFilesError(RuntimeError):
    pass


def locate_openclip_merges() -> Path:
    """open_clip's BPE merges file, found without importing open_clip (its import pulls
    torchvision, which breaks transformers next to a CPU-only torch)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / MERGES_FILE
        if path.is_file():
            return path
    raise TokenizerFilesError(
        f"the CLIP BPE merges file ({MERGES_FILE}) was not found: pip install --no-deps open_clip_torch"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode symbol table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def clip_vocab_and_merges(merges_gz: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary exactly as OpenAI's / open_clip's SimpleTokenizer builds it."""
    with gzip.open(merges_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is the version header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(merges) != N_MERGES or len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise TokenizerFilesError(f"{merges_gz} gives {len(tokens)} tokens, expected {VOCAB_SIZE} distinct ones")
    return {t: i for i, t in enumerate(tokens)}, merges


# Well-known ids of the CLIP vocabulary (OpenAI CLIP, open_clip and the laion bigG tokenizer agree).
KNOWN_IDS = {
    "a photo of a cat": [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID],
    "": [BOS_ID, EOS_ID],
}


def verify_clip_tokenizer(tok) -> None:
    """Raise unless `tok` (a transformers CLIPTokenizer) has the bigG tokenizer's ids and settings."""
    problems = []
    if len(tok) != VOCAB_SIZE:
        problems.append(f"vocabulary size {len(tok)} != {VOCAB_SIZE}")
    if (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) != (BOS_ID, EOS_ID, PAD_ID):
        problems.append(f"bos/eos/pad ids {(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)}"
                        f" != {(BOS_ID, EOS_ID, PAD_ID)}")
    if tok.model_max_length != MAX_LENGTH:
        problems.append(f"model_max_length {tok.model_max_length} != {MAX_LENGTH}")
    for text, expected in KNOWN_IDS.items():
        got = tok(text)["input_ids"]
        if got != expected:
            problems.append(f"{text!r} -> {got}, expected {expected}")
    if problems:
        raise TokenizerFilesError("the CLIP tokenizer does not match the bigG tokenizer: " + "; ".join(problems))


def build_clip_tokenizer_from_merges(merges_gz: Path, out_dir: Path) -> None:
    """Write vocab.json + merges.txt rebuilt from open_clip's merges file, then transformers'
    saved files (tokenizer.json, tokenizer_config.json) of a CLIPTokenizer made from them."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    vocab, merges = clip_vocab_and_merges(Path(merges_gz))
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # pad "!" (id 0) and 77 tokens: the laion bigG tokenizer's settings
    tok = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), unk_token="<|endoftext|>",
                        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="!",
                        model_max_length=MAX_LENGTH)
    verify_clip_tokenizer(tok)
    tok.save_pretrained(out_dir)
    # what the bundle ships must load back the same
    verify_clip_tokenizer(CLIPTokenizer.from_pretrained(out_dir))


def write_tokenizer_files(out_dir: Path, source: str | Path | None, revision: str | None = None) -> dict:
    """Write the tokenizer files into `out_dir`; returns a description for the manifest."""
    out_dir = Path(out_dir)
    if source is None:
        merges = locate_openclip_merges()
        build_clip_tokenizer_from_merges(merges, out_dir)
        described = {"kind": "open_clip-merges", "file": MERGES_FILE}
    else:
        from transformers import CLIPTokenizer

        try:
            tok = CLIPTokenizer.from_pretrained(str(source), revision=revision)
        except (OSError, ValueError) as e:
            raise TokenizerFilesError(f"cannot load the CLIP tokenizer from {source}: {e}") from e
        verify_clip_tokenizer(tok)  # the bigG text encoder needs the bigG tokenizer's ids and padding
        out_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(out_dir)
        described = {"kind": "pretrained", "source": str(source), "revision": revision}
    if not (out_dir / "tokenizer.json").is_file():
        raise TokenizerFilesError(f"no tokenizer.json was written to {out_dir}")
    return described
