"""λ-ECLIPSE subject images on the edge runtime (runtime/subjects.py): decoding, the
CLIPImageProcessor preprocessing (against transformers' own), Canny, the official interleaving."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eclipse_export.families.lambda_eclipse.presets import IMAGE_PROCESSOR_CLIP
from eclipse_export.runtime.subjects import (
    ImageProcessorConfig,
    SubjectError,
    SubjectImage,
    canny,
    interleave,
    keyword_ids,
    load_image,
    preprocess,
    resize_output_size,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ImageProcessorConfig.from_json(IMAGE_PROCESSOR_CLIP)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients + edges + noise: bicubic's overshoot and rounding both show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), ((x // 7 + y // 5) % 2) * 255], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _reference_processor():
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(**{k: v for k, v in IMAGE_PROCESSOR_CLIP.items() if k != "image_processor_type"})


# sizes and aspect ratios: square at the target, down- and up-scaling, tall, wide, odd, extreme
SIZES = [(224, 224), (300, 200), (200, 300), (512, 512), (1000, 225), (225, 1000), (57, 81), (97, 13), (3, 400),
         (4032, 3024)]


@pytest.mark.parametrize("h,w", SIZES)
def test_preprocessing_matches_transformers_clip_image_processor(h, w):
    rgb = _photo(h, w, seed=h * 7 + w)
    want = _reference_processor()(Image.fromarray(rgb), return_tensors="np").pixel_values[0]
    got = preprocess(SubjectImage(rgb, "t"), CONFIG)
    assert got.shape == want.shape == (3, 224, 224) and got.dtype == np.float32
    # measured max difference (transformers 5.25, Pillow 13, numpy 2.4): 0 on every case here,
    # i.e. the same float32 values; the bound leaves room for one float32 ulp of the normalisation
    assert np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK"])
def test_preprocessing_of_every_mode_matches_transformers_on_the_decoded_image(mode, tmp_path):
    """What we decode (RGB8) goes through the same preprocessing as transformers'; modes are
    decoded as documented (transparency on white, greyscale and palette to RGB)."""
    rgb = _photo(150, 260, seed=3)
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = np.full(rgb.shape[:2], 255, np.uint8)
        alpha[:, :100] = 0
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode == "LA":
        image = image.convert("LA")
    elif mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L"), np.uint16) * 257))
    else:
        image = image.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    image.save(path)
    decoded = load_image(path)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (150, 260, 3)
    want = _reference_processor()(Image.fromarray(decoded.pixels), return_tensors="np").pixel_values[0]
    assert np.abs(preprocess(decoded, CONFIG) - want).max() <= 1e-6
    if mode == "RGBA":
        assert (decoded.pixels[:, :100] == 255).all()  # transparent -> white
        np.testing.assert_array_equal(decoded.pixels[:, 100:], rgb[:, 100:])
    if mode in ("L", "LA", "1", "I;16"):
        px = decoded.pixels
        assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
    if mode == "I;16":  # 16-bit greyscale is scaled to 8 bits, not clipped
        np.testing.assert_allclose(decoded.pixels[..., 0], np.asarray(Image.fromarray(rgb).convert("L")), atol=1)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    p = Image.new("P", (8, 8), 0)
    p.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    p.paste(1, (4, 0, 8, 8))
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    px = load_image(tmp_path / "p.png").pixels
    assert (px[:, :4] == 255).all() and (px[:, 4:] == [200, 100, 50]).all()


def test_exif_orientation_is_applied(tmp_path):
    rgb = _photo(40, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise for display
    Image.fromarray(rgb).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=100)
    px = load_image(tmp_path / "o.jpg").pixels
    assert px.shape == (100, 40, 3)
    upright = np.asarray(Image.open(tmp_path / "o.jpg").transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(px, upright)


def test_arrays_and_pil_images_are_accepted():
    rgb = _photo(30, 40)
    np.testing.assert_array_equal(load_image(rgb).pixels, rgb)
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb)).pixels, rgb)
    grey = rgb[..., 0]
    assert load_image(grey).pixels.shape == (30, 40, 3)


@pytest.mark.parametrize("bad,match", [
    ("missing.png", "no such file"),
    ("empty.png", "the file is empty"),
    ("text.png", "not a readable image"),
    ("truncated.png", "not a readable image"),
    ("dir", "not a file"),
])
def test_bad_images_are_one_clear_error(bad, match, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    buf = io.BytesIO()
    Image.fromarray(_photo(64, 64)).save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[:200])
    (tmp_path / "dir").mkdir()
    with pytest.raises(SubjectError, match=match):
        load_image(tmp_path / bad)


def test_bad_arrays_are_refused():
    with pytest.raises(SubjectError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(SubjectError, match="empty"):
        load_image(np.zeros((0, 4, 3), np.uint8))


def test_resize_size_is_transformers():
    from transformers.image_transforms import get_resize_output_image_size

    for h, w in SIZES:
        want = get_resize_output_image_size(np.zeros((h, w, 3)), size=224, default_to_square=False,
                                            input_data_format="channels_last")
        assert resize_output_size(h, w, 224) == tuple(want)


def test_canny_is_opencvs_on_the_grey_image():
    cv2 = pytest.importorskip("cv2")
    rgb = _photo(80, 120)
    edges = canny(SubjectImage(rgb, "x")).pixels
    want = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 100, 200)
    assert edges.shape == (80, 120, 3) and set(np.unique(edges)) <= {0, 255}
    for c in range(3):
        np.testing.assert_array_equal(edges[..., c], want)
    assert edges.any()


# --- interleaving -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from eclipse_export.export.tokenizer_files import write_tokenizer_files
    from eclipse_export.runtime.tokenizer import ClipTokenizer

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer_files(Path(d), None)
        yield ClipTokenizer.from_dir(d)


def test_keyword_ids_are_the_official_sub_tokens(tokenizer):
    from transformers import CLIPTokenizer

    from eclipse_export.export.tokenizer_files import write_tokenizer_files

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer_files(Path(d), None)
        hf = CLIPTokenizer.from_pretrained(d)
    for word in ("dog", "corgidog", "hot dog", "Sunglasses!", "🐶", "the-mug"):
        assert keyword_ids(tokenizer, word) == hf(word)["input_ids"][1:-1]
    with pytest.raises(SubjectError, match="tokenizes to nothing"):
        keyword_ids(tokenizer, "   ")


def test_interleave_replaces_every_sub_token_position_and_later_subjects_win(tokenizer):
    prompts = ["a corgi dog and a dog with a hot dog", "a cat"]
    tok = tokenizer(prompts)
    hidden = np.random.default_rng(0).standard_normal((2, 77, 4)).astype(np.float32)
    dog, hot = np.full(4, 1.0, np.float32), np.full(4, 2.0, np.float32)
    subjects = [(keyword_ids(tokenizer, "dog"), dog), (keyword_ids(tokenizer, "hot dog"), hot)]
    out, found = interleave(tok.input_ids, hidden, subjects)
    ids = tok.input_ids[0]
    dog_id, hot_id = keyword_ids(tokenizer, "dog")[0], keyword_ids(tokenizer, "hot")[0]
    # every "dog" position took the later subject (it shares the "dog" token), "hot" too
    assert (ids == dog_id).sum() == 3
    for pos in np.where((ids == dog_id) | (ids == hot_id))[0]:
        np.testing.assert_array_equal(out[0, pos], hot)
    untouched = ~np.isin(ids, [dog_id, hot_id])
    np.testing.assert_array_equal(out[0, untouched], hidden[0, untouched])
    np.testing.assert_array_equal(out[1], hidden[1])  # no keyword in the second prompt
    assert found == [[True, True], [False, False]]
    np.testing.assert_array_equal(hidden, np.random.default_rng(0).standard_normal((2, 77, 4)).astype(np.float32))
