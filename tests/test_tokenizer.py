"""The edge tokenizer (tokenizers library only) gives the same ids as transformers' CLIPTokenizer."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from eclipse_export.export.tokenizer_files import write_tokenizer_files
from eclipse_export.runtime.tokenizer import ClipTokenizer

LONG = " ".join(f"word{i} and a red cube" for i in range(60))
WORDS_200 = " ".join(["a", "small", "red", "cube", "on", "top", "of", "a", "large", "blue", "sphere", "near", "a",
                      "window", "in", "the", "morning", "light", "with", "shadows"] * 10)  # 200 words
PROMPTS = [
    "a red cube on a blue sphere",
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    " ",
    "a cat,a dog;a bird!",
    "two dogs and 3 cats, 4.5 meters tall",
    "café crème brûlée",
    "東京の夜景、ネオンサイン",
    "кот на крыше",
    "emoji 🐱🚀 and ❤️",
    "tabs\tand\nnewlines   and   spaces",
    "HTML &amp; entities &lt;b&gt;",
    "don't stop believin'",
    "it's a dog's life; isn't it?",
    "a-b c_d e/f g\\h",
    "(parentheses) [brackets] {braces}",
    "hello@example.com #hashtag $100 50%",
    "a painting in the style of Van Gogh, trending on artstation, 8k",
    "ＦＵＬＬＷＩＤＴＨ letters",
    "ligature ﬁ and ß",
    "a" * 300,
    LONG,
    LONG + " tail",
    WORDS_200,
    "x " * 74 + "y",  # exactly 75 words + bos/eos: fits, not truncated
    "x " * 75 + "y",  # one word too many
    "a painting &quot;sunrise&quot; &#39;quoted&#39; &eacute;t&eacute;",
    "UPPER CASE PROMPT WITH ÀCCENTS AND ÑOÑO",
    "line one\r\nline two\n\n\nline three",
    "   leading and trailing spaces   ",
    "한국어 텍스트 그리고 中文文本",
    "نص عربي",
    "3.14159 2,718 1e-10 -42",
    "the quick brown fox jumps over the lazy dog " * 10,
    "a cube to the left of a sphere",
    "a wooden table and a metallic chair",
    "a fluffy cat sitting behind a glass vase",
    "three red apples and two green pears",
    "a man riding a horse on the beach at sunset",
    "<|startoftext|> special tokens <|endoftext|>",
    "!!!",
    "numbers 1234567890 12 345",
    "mixed CASE and snake_case and camelCase",
    "über naïve façade",
    "a\u200bzero width space",
    "multiple... dots... here...",
    "quotes \"double\" and 'single'",
    "a 🐕 next to a 🐈",
    "one",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(out, None)
    return out


def test_ids_identical_to_transformers(tokenizer_dir):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(tokenizer_dir)(PROMPTS, padding="max_length", max_length=77,
                                                       truncation=True, return_tensors="np")
    ours = ClipTokenizer.from_dir(tokenizer_dir)(PROMPTS)
    assert len(PROMPTS) >= 40 and any(len(p.split()) == 200 for p in PROMPTS)
    assert ours.input_ids.dtype == np.int32 and ours.input_ids.shape == (len(PROMPTS), 77)
    for i, p in enumerate(PROMPTS):
        assert ours.input_ids[i].tolist() == ref["input_ids"][i].tolist(), p
        assert ours.attention_mask[i].tolist() == ref["attention_mask"][i].tolist(), p


def test_known_clip_ids_and_padding(tokenizer_dir):
    batch = ClipTokenizer.from_dir(tokenizer_dir)(["a photo of a cat"])
    assert batch.input_ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (batch.input_ids[0, 7:] == 0).all()  # pad "!" is id 0, as in the bigG tokenizer
    assert batch.attention_mask[0].sum() == 7


def test_truncation_is_reported_and_keeps_eos(tokenizer_dir):
    from transformers import CLIPTokenizer

    full = CLIPTokenizer.from_pretrained(tokenizer_dir)(PROMPTS)["input_ids"]  # no truncation
    long = {i for i, ids in enumerate(full) if len(ids) > 77}
    assert {PROMPTS.index(p) for p in (LONG, LONG + " tail", WORDS_200, "x " * 75 + "y")} <= long
    assert PROMPTS.index("x " * 74 + "y") not in long and len(full[PROMPTS.index("x " * 74 + "y")]) == 77
    batch = ClipTokenizer.from_dir(tokenizer_dir)(PROMPTS)
    assert {i for i, cut in enumerate(batch.truncated) if cut} == long
    for i in long:
        assert batch.input_ids[i, -1] == 49407 and batch.attention_mask[i].all()
        assert batch.input_ids[i, :76].tolist() == full[i][:76]  # bos + the first 75 tokens


def test_written_files_and_manifest_entry(tmp_path, tokenizer_dir):
    import json

    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (tokenizer_dir / name).is_file(), name
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["!"] == 0 and vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407 and vocab["cat</w>"] == 2368
    # a "pretrained" source (a local directory here) round-trips through transformers' files
    described = write_tokenizer_files(tmp_path / "copy", tokenizer_dir)
    assert described["kind"] == "pretrained" and described["source"] == str(tokenizer_dir)
    prompts = PROMPTS[:10]
    np.testing.assert_array_equal(ClipTokenizer.from_dir(tmp_path / "copy")(prompts).input_ids,
                                  ClipTokenizer.from_dir(tokenizer_dir)(prompts).input_ids)


def test_pad_token_is_exclamation_mark(tokenizer_dir):
    """As in the laion bigG tokenizer (and the diffusers SDXL tokenizer_2): pad "!" is id 0 and a
    special token, so a "!" in a prompt is id 0 too (open_clip would give 256 "!</w>")."""
    batch = ClipTokenizer.from_dir(tokenizer_dir)(["wow!", "!!!"])
    assert batch.input_ids[0, :4].tolist() == [49406, 2781, 0, 49407]  # "wow</w>", then "!" as the pad id
    assert batch.input_ids[1, :5].tolist() == [49406, 0, 0, 0, 49407]
    assert batch.attention_mask[1].tolist() == [1] * 5 + [0] * 72


def test_rejects_a_bare_string(tokenizer_dir):
    with pytest.raises(TypeError):
        ClipTokenizer.from_dir(tokenizer_dir)("a photo of a cat")


def test_runtime_tokenizer_imports_no_torch_or_transformers():
    code = ("import sys, eclipse_export.runtime.tokenizer; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
