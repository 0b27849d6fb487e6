"""The runtime refuses missing, altered, foreign or newer bundles with a message saying what to do."""

from __future__ import annotations

import json

import pytest

from eclipse_export.runtime.bundle import BundleError, open_bundle


def test_intact_bundle_opens(tiny_bundle):
    assert open_bundle(tiny_bundle).precision == "fp32"


def test_missing_file(tiny_bundle_copy):
    (tiny_bundle_copy / "unet.onnx").unlink()
    with pytest.raises(BundleError, match="missing unet.onnx.*re-export"):
        open_bundle(tiny_bundle_copy)


def test_altered_file_same_size(tiny_bundle_copy):
    path = tiny_bundle_copy / "prior.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="prior.onnx was altered"):
        open_bundle(tiny_bundle_copy)
    open_bundle(tiny_bundle_copy, verify_hashes=False)  # sizes only: passes


def test_truncated_file(tiny_bundle_copy):
    path = tiny_bundle_copy / "negative_image_embeds.npy"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(BundleError, match="negative_image_embeds.npy has"):
        open_bundle(tiny_bundle_copy, verify_hashes=False)


def test_every_problem_is_reported(tiny_bundle_copy):
    (tiny_bundle_copy / "unet.onnx").unlink()
    (tiny_bundle_copy / "movq.onnx").unlink()
    with pytest.raises(BundleError) as e:
        open_bundle(tiny_bundle_copy)
    assert "missing movq.onnx" in str(e.value) and "missing unet.onnx" in str(e.value)


def test_newer_format(tiny_bundle_copy):
    path = tiny_bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer than this runtime reads.*upgrade"):
        open_bundle(tiny_bundle_copy)


@pytest.mark.parametrize("content, message", [(None, "no manifest.json"), ("{not json", "unreadable"),
                                              ('{"format": "other"}', "not an eclipse-export bundle")])
def test_bad_manifest(tiny_bundle_copy, content, message):
    path = tiny_bundle_copy / "manifest.json"
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises(BundleError, match=message):
        open_bundle(tiny_bundle_copy)


def test_not_a_directory(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        open_bundle(tmp_path / "nope")
