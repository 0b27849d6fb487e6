"""The edge tokenizer (tokenizers library only) gives the same ids as transformers' CLIPTokenizer."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from eclipse_export.runtime.tokenizer import ClipTokenizer
from eclipse_export.tokenizer_files import write_tokenizer_files

LONG = " ".join(f"word{i} and a red cube" for i in range(60))
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


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(out, None)
    return out


def test_ids_identical_to_transformers(tokenizer_dir):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(tokenizer_dir)(PROMPTS, padding="max_length", max_length=77,
                                                       truncation=True, return_tensors="np")
    ours = ClipTokenizer.from_dir(tokenizer_dir)(PROMPTS)
    assert len(PROMPTS) >= 40
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
    batch = ClipTokenizer.from_dir(tokenizer_dir)(PROMPTS)
    long = {i for i, p in enumerate(PROMPTS) if p in (LONG, LONG + " tail") or p.startswith("the quick")}
    assert {i for i, cut in enumerate(batch.truncated) if cut} == long
    for i in long:
        assert batch.input_ids[i, -1] == 49407 and batch.attention_mask[i].all()


def test_runtime_tokenizer_imports_no_torch_or_transformers():
    code = ("import sys, eclipse_export.runtime.tokenizer; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
