"""The C library's subject-image decoding (libpng) and CLIP preprocessing (cpp/src/core/
image_input.cpp) against the Python runtime's (runtime/subjects.py: Pillow, which
tests/test_subjects.py holds to transformers' CLIPImageProcessor), through the
`eclipse-image-check` test program: the same decoded bytes, the same float32 pixel values.

Runs on the plain build (build/cpp) and, when it is built, the AddressSanitizer + UBSan build
(build/cpp-asan), so the decoder's error paths (truncated files, forged sizes) run under ASan.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eclipse_export.families.lambda_eclipse.presets import IMAGE_PROCESSOR_CLIP
from eclipse_export.runtime.subjects import ImageProcessorConfig, SubjectError, load_image, preprocess

from .test_subjects import SIZES, _photo

ROOT = Path(__file__).resolve().parents[1]


def _builds() -> list:
    dirs = [Path(os.environ.get("ECLIPSE_BIN_DIR") or ROOT / "build" / "cpp"), ROOT / "build" / "cpp-asan"]
    out = []
    for d in dict.fromkeys(dirs):
        exe = d / "eclipse-image-check"
        out.append(pytest.param(exe, id=d.name,
                                marks=[] if exe.is_file() else pytest.mark.skip(reason=f"{exe} is not built (make cpp / cpp-asan)")))
    return out


@pytest.fixture(params=_builds())
def check(request):
    exe = request.param
    env = dict(os.environ, ASAN_OPTIONS="abort_on_error=1", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")

    def run(*args) -> subprocess.CompletedProcess:
        done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
        assert "runtime error:" not in done.stderr and "AddressSanitizer" not in done.stderr, done.stderr
        return done

    return run


def _decode(check, path: Path, tmp_path: Path) -> np.ndarray:
    out = tmp_path / "out.rgb"
    done = check("decode", path, out)
    assert done.returncode == 0, done.stderr
    w, h = map(int, done.stdout.split())
    return np.fromfile(out, np.uint8).reshape(h, w, 3)


# --- PNGs of every colour type and bit depth, written chunk by chunk (Pillow cannot write all) ----

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(path: Path, rows: list[bytes], width: int, color_type: int, bit_depth: int, before_idat=(), after_idat=()) -> Path:
    """A PNG from raw scanlines (filter 0), with extra chunks (PLTE, tRNS, eXIf ...)."""
    ihdr = struct.pack(">IIBBBBB", width, len(rows), bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + r for r in rows))
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    data += b"".join(_chunk(k, v) for k, v in before_idat) + _chunk(b"IDAT", idat)
    data += b"".join(_chunk(k, v) for k, v in after_idat) + _chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def _pack_bits(values: np.ndarray, bits: int) -> list[bytes]:
    """Rows of small integers packed MSB first, as PNG stores 1/2/4-bit samples."""
    per = 8 // bits
    rows = []
    for row in values:
        padded = np.concatenate([row, np.zeros((-len(row)) % per, row.dtype)]).reshape(-1, per)
        shifts = np.arange(per - 1, -1, -1) * bits
        rows.append(bytes((padded.astype(np.uint16) << shifts).sum(axis=1).astype(np.uint8)))
    return rows


def _exif(orientation: int, little: bool) -> bytes:
    e = "<" if little else ">"
    head = (b"II*\x00" if little else b"MM\x00*") + struct.pack(e + "I", 8)
    # IFD0: two entries (a harmless one first, then Orientation), then "no next IFD"
    ifd = struct.pack(e + "H", 2)
    ifd += struct.pack(e + "HHI", 0x0100, 4, 1) + struct.pack(e + "I", 7)  # ImageWidth (LONG)
    ifd += struct.pack(e + "HHI", 0x0112, 3, 1) + struct.pack(e + "HH", orientation, 0)
    return head + ifd + struct.pack(e + "I", 0)


def _cases(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    h, w = 5, 7
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cases = {}
    # every (value, alpha) pair once: Pillow's integer compositing on white, exhaustively
    va = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1).astype(np.uint8)  # (256,256,2)
    rgba = np.concatenate([va[..., :1], 255 - va[..., :1], va[..., :1] // 3, va[..., 1:]], axis=-1)
    cases["rgba-all-alphas"] = _png(tmp_path / "rgba.png", [r.tobytes() for r in rgba], 256, 6, 8)
    cases["grey-alpha"] = _png(tmp_path / "la.png", [r.tobytes() for r in va[::7]], 256, 4, 8)
    cases["rgb8"] = _png(tmp_path / "rgb.png", [r.tobytes() for r in rgb], w, 2, 8)
    cases["grey8"] = _png(tmp_path / "l.png", [r.tobytes() for r in rgb[..., 0]], w, 0, 8)
    for bits in (1, 2, 4):
        vals = rng.integers(0, 2 ** bits, (h, w), dtype=np.uint8)
        cases[f"grey{bits}"] = _png(tmp_path / f"l{bits}.png", _pack_bits(vals, bits), w, 0, bits)
    cases["grey8-trns"] = _png(tmp_path / "ltrns.png", [r.tobytes() for r in rgb[..., 0]], w, 0, 8,
                               before_idat=[(b"tRNS", struct.pack(">H", int(rgb[0, 0, 0])))])
    cases["rgb8-trns"] = _png(tmp_path / "rgbtrns.png", [r.tobytes() for r in rgb], w, 2, 8,
                              before_idat=[(b"tRNS", struct.pack(">HHH", *map(int, rgb[0, 0])))])
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (h, w), dtype=np.uint8)
    cases["palette8"] = _png(tmp_path / "p.png", [r.tobytes() for r in index], w, 3, 8,
                             before_idat=[(b"PLTE", palette.tobytes())])
    cases["palette4-trns"] = _png(tmp_path / "p4t.png", _pack_bits(index, 4), w, 3, 4,
                                  before_idat=[(b"PLTE", palette.tobytes()),
                                               (b"tRNS", bytes(rng.integers(0, 256, 10, dtype=np.uint8)))])
    rgb16 = rng.integers(0, 65536, (h, w, 3), dtype=np.uint16)
    cases["rgb16"] = _png(tmp_path / "rgb16.png", [r.astype(">u2").tobytes() for r in rgb16], w, 2, 16)
    rgba16 = rng.integers(0, 65536, (h, w, 4), dtype=np.uint16)
    cases["rgba16"] = _png(tmp_path / "rgba16.png", [r.astype(">u2").tobytes() for r in rgba16], w, 6, 16)
    cases["grey16-wide"] = _png(tmp_path / "l16.png", [r.astype(">u2").tobytes() for r in rgb16[..., 0]], w, 0, 16)
    small = rng.integers(0, 256, (h, w), dtype=np.uint16)  # 16-bit file, values <= 255: kept as they are
    cases["grey16-narrow"] = _png(tmp_path / "l16n.png", [r.astype(">u2").tobytes() for r in small], w, 0, 16)
    for orientation in range(1, 9):
        for little in (True, False):
            name = f"exif-{orientation}-{'II' if little else 'MM'}"
            cases[name] = _png(tmp_path / f"{name}.png", [r.tobytes() for r in rgb], w, 2, 8,
                               after_idat=[(b"eXIf", _exif(orientation, little))])
    # written by Pillow itself (its own filters and zlib settings), incl. an EXIF block before IDAT
    Image.fromarray(_photo(31, 17)).save(tmp_path / "pillow.png")
    cases["pillow-rgb"] = tmp_path / "pillow.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_photo(9, 14)).save(tmp_path / "pillow-exif.png", exif=exif)
    cases["pillow-exif6"] = tmp_path / "pillow-exif.png"
    return cases


def test_decoding_equals_the_python_runtime_for_every_png_kind(check, tmp_path):
    cases = _cases(tmp_path)
    differing = {}
    for name, path in cases.items():
        want = load_image(path).pixels
        got = _decode(check, path, tmp_path)
        if got.shape != want.shape or not np.array_equal(got, want):
            differing[name] = (got.shape, want.shape,
                               int(np.abs(got.astype(int) - want.astype(int)).max()) if got.shape == want.shape else None)
    assert not differing, differing
    # the orientation cases really turn the image (a test that passes with EXIF ignored proves nothing)
    assert load_image(cases["exif-6-II"]).pixels.shape[:2] == (7, 5)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_caller_buffers_equal_python_arrays(check, tmp_path, channels):
    rng = np.random.default_rng(channels)
    h, w = 6, 9
    arr = rng.integers(0, 256, (h, w) if channels == 1 else (h, w, channels), dtype=np.uint8)
    stride = w * channels + 5  # a padded row pitch, as a camera buffer has
    raw = np.zeros((h, stride), np.uint8)
    raw[:, : w * channels] = arr.reshape(h, -1)
    (tmp_path / "in.raw").write_bytes(raw.tobytes())
    done = check("buffer", tmp_path / "in.raw", w, h, channels, stride, tmp_path / "out.rgb")
    assert done.returncode == 0, done.stderr
    got = np.fromfile(tmp_path / "out.rgb", np.uint8).reshape(h, w, 3)
    assert np.array_equal(got, load_image(arr).pixels)


def _config_file(tmp_path: Path, **override) -> tuple[Path, dict]:
    config = dict(IMAGE_PROCESSOR_CLIP, **override)
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(config))
    return path, config


# (h, w) -> (new w, new h): down/up-scaling, one axis only, and both pass orders of Pillow 13
# (vertical first when the height shrinks by more than twice as many pixels as the width)
RESIZES = [((1000, 225), (224, 995)), ((300, 200), (224, 336)), ((4032, 3024), (298, 224)), ((3, 400), (224, 29)),
           ((97, 13), (224, 1671)), ((50, 80), (80, 20)), ((50, 80), (33, 50)), ((64, 64), (64, 64)),
           ((401, 300), (299, 200)), ((401, 300), (250, 200))]


@pytest.mark.parametrize("size,new", RESIZES)
def test_resize_equals_pillow_bicubic(check, tmp_path, size, new):
    rgb = _photo(*size, seed=sum(size))
    Image.fromarray(rgb).save(tmp_path / "in.png")
    done = check("resize", tmp_path / "in.png", *new, tmp_path / "out.rgb")
    assert done.returncode == 0, done.stderr
    got = np.fromfile(tmp_path / "out.rgb", np.uint8).reshape(new[1], new[0], 3)
    want = np.asarray(Image.fromarray(rgb).resize(new, resample=Image.Resampling.BICUBIC))
    assert np.array_equal(got, want), int(np.abs(got.astype(int) - want.astype(int)).max())


@pytest.mark.parametrize("h,w", SIZES)
def test_preprocessing_equals_the_python_runtime(check, tmp_path, h, w):
    """Pillow's fixed-point bicubic, the crop and the normalisation give the same float32 values:
    measured max difference 0 on every size here (down- and up-scaling, tall, wide, extreme)."""
    config_path, config = _config_file(tmp_path)
    image = tmp_path / "subject.png"
    Image.fromarray(_photo(h, w, seed=h + w)).save(image)
    out = tmp_path / "values.f32"
    done = check("preprocess", config_path, image, out)
    assert done.returncode == 0, done.stderr
    got = np.fromfile(out, np.float32).reshape(3, 224, 224)
    want = preprocess(load_image(image), ImageProcessorConfig.from_json(config))
    assert np.abs(got - want).max() == 0.0


def test_preprocessing_pads_a_crop_larger_than_the_resized_image(check, tmp_path):
    config_path, config = _config_file(tmp_path, crop_size={"height": 260, "width": 250})
    image = tmp_path / "subject.png"
    Image.fromarray(_photo(40, 90)).save(image)
    out = tmp_path / "values.f32"
    done = check("preprocess", config_path, image, out)
    assert done.returncode == 0, done.stderr
    want = preprocess(load_image(image), ImageProcessorConfig.from_json(config))
    got = np.fromfile(out, np.float32).reshape(want.shape)
    assert want.shape == (3, 260, 250) and np.abs(got - want).max() == 0.0


def _refused(check, path: Path, tmp_path: Path) -> str:
    done = check("decode", path, tmp_path / "out.rgb")
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: subject image "), done.stderr
    return lines[0]


def test_unusable_files_are_refused_in_one_line_as_python_refuses_them(check, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_photo(20, 20)).save(good)
    data = good.read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    Image.fromarray(_photo(8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "folder.png").mkdir()
    # a 100000 x 100000 header: refused from the header, before anything is allocated
    huge = _png(tmp_path / "huge.png", [b"\x00" * 3], 1, 2, 8)
    blob = bytearray(huge.read_bytes())
    blob[16:24] = struct.pack(">II", 100000, 100000)
    blob[29:33] = struct.pack(">I", zlib.crc32(bytes(blob[12:29])) & 0xFFFFFFFF)
    huge.write_bytes(bytes(blob))
    expect = {"missing.png": "no such file", "empty.png": "the file is empty", "folder.png": "not a file",
              "truncated.png": "not a readable image", "garbage.png": "not a readable image",
              "photo.jpg": "not a readable image", "huge.png": "larger than this runtime reads"}
    for name, words in expect.items():
        path = tmp_path / name
        line = _refused(check, path, tmp_path)
        assert words in line and str(path) in line, line
        if name == "photo.jpg":  # Pillow reads JPEG; the C runtime reads PNG and says so
            assert "the C runtime reads PNG files" in line
            continue
        with pytest.raises(SubjectError, match=words):  # the Python runtime refuses the same file
            load_image(path)


def test_bad_buffers_and_configs_are_refused(check, tmp_path):
    (tmp_path / "in.raw").write_bytes(b"\x00" * 64)
    for args, words in [((4, 4, 2, 0), "channels must be 1"), ((0, 4, 3, 0), "empty"), ((4, 4, 3, 5), "stride")]:
        done = check("buffer", tmp_path / "in.raw", *args, tmp_path / "out.rgb")
        assert done.returncode == 2 and words in done.stderr, done.stderr
    image = tmp_path / "s.png"
    Image.fromarray(_photo(8, 8)).save(image)
    for override, words in [({"do_center_crop": False}, "must all be true"), ({"resample": 2}, "bicubic"),
                            ({"image_std": [1, 0, 1]}, "image_std")]:
        config_path, _ = _config_file(tmp_path, **override)
        done = check("preprocess", config_path, image, tmp_path / "v.f32")
        assert done.returncode == 2 and words in done.stderr and "preprocessor_config.json" in done.stderr, done.stderr
        if override != {"resample": 2}:  # the Python runtime hands other resamples to Pillow
            with pytest.raises(ValueError):
                ImageProcessorConfig.from_json(json.loads(config_path.read_text()))
