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


# --- every path the runtime opens is a verified file inside the bundle ----------------------------

def _edit_manifest(bundle, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _outside_file(tmp_path):
    """A real graph outside the bundle, listed with its true size and hash: only the path is wrong."""
    from eclipse_export.runtime.bundle import file_entry

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.onnx").write_bytes(b"not a graph")
    return outside / "evil.onnx", file_entry(outside, "evil.onnx")


@pytest.mark.parametrize("where", ["graph", "files_key", "engine"])
@pytest.mark.parametrize("style", ["absolute", "dotdot", "dotdot_inside", "backslash"])
def test_paths_outside_the_bundle_are_refused_before_anything_opens(tiny_bundle_copy, tmp_path, where, style):
    evil, entry = _outside_file(tmp_path)
    rel = {"absolute": str(evil), "dotdot": "../outside/evil.onnx", "dotdot_inside": "tokenizer/../prior.onnx",
           "backslash": "..\\outside\\evil.onnx"}[style]

    def change(m):
        m["files"][rel] = entry
        if where == "graph":
            m["components"]["prior"]["graph"] = rel
            m["components"]["prior"]["files"] = [rel]
        elif where == "engine":
            m["engines"] = {"prior": {"file": rel, "flavour": "tensorrt-rtx", "version": "1.7", "key": "k",
                                      "compute_capabilities": ["SM89"]}}

    _edit_manifest(tiny_bundle_copy, change)
    with pytest.raises(BundleError, match="invalid:.*(absolute|relative|backslash)"):
        open_bundle(tiny_bundle_copy)


def test_symlink_out_of_the_bundle_is_refused(tiny_bundle_copy, tmp_path):
    evil, entry = _outside_file(tmp_path)
    (tiny_bundle_copy / "evil.onnx").symlink_to(evil)
    (tiny_bundle_copy / "prior.onnx").unlink()
    (tiny_bundle_copy / "prior.onnx").symlink_to(evil)

    def change(m):
        m["files"]["prior.onnx"] = entry

    _edit_manifest(tiny_bundle_copy, change)
    with pytest.raises(BundleError, match="prior.onnx resolves outside the bundle"):
        open_bundle(tiny_bundle_copy)


def test_a_graph_not_listed_in_files_is_refused(tiny_bundle_copy):
    import shutil

    shutil.copy(tiny_bundle_copy / "prior.onnx", tiny_bundle_copy / "unlisted.onnx")
    _edit_manifest(tiny_bundle_copy, lambda m: m["components"]["prior"].update(graph="unlisted.onnx"))
    with pytest.raises(BundleError, match="components.prior.graph 'unlisted.onnx' is not one of the manifest's files"):
        open_bundle(tiny_bundle_copy)


def test_bundle_path_hands_out_listed_files_only(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    assert bundle.path("prior.onnx") == tiny_bundle / "prior.onnx"
    for rel in ("manifest.json", "tokenizer", "../x", "/etc/passwd", "nope.onnx"):
        with pytest.raises(BundleError, match="does not list"):
            bundle.path(rel)


def test_graph_that_does_not_fit_the_manifest_is_refused_at_load(tiny_bundle_copy):
    """The manifest names the prior's graph as the UNet's: refused when loading, not mid-generation."""
    from eclipse_export.runtime.pipeline import Pipeline

    def change(m):
        m["components"]["unet"]["graph"] = "prior.onnx"
        m["components"]["unet"]["files"] = ["prior.onnx"]

    _edit_manifest(tiny_bundle_copy, change)
    with pytest.raises(BundleError, match="unet graph does not fit the manifest.*has no tensor 'sample'"):
        Pipeline.from_bundle(tiny_bundle_copy)


def test_dims_that_do_not_match_the_graphs_are_refused_at_load(tiny_bundle_copy):
    from eclipse_export.runtime.pipeline import Pipeline

    _edit_manifest(tiny_bundle_copy, lambda m: m["dims"].update(T=76))
    with pytest.raises(BundleError, match="text_encoder graph does not fit.*input_ids axis 1 is 77.*76"):
        Pipeline.from_bundle(tiny_bundle_copy)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(files=[]), "'files' must be a non-empty object"),
    (lambda m: m["files"]["prior.onnx"].update(bytes="12"), "bytes must be a non-negative integer"),
    (lambda m: m["files"]["prior.onnx"].update(sha256="abc"), "sha256 must be 64"),
    (lambda m: m.update(precision="fp8"), "precision must be one of"),
    (lambda m: m["dims"].update(D=10**12), "dims.D must be an integer"),
    (lambda m: m["components"].pop("movq"), "'components' must name exactly"),
    (lambda m: m["files"].pop("negative_image_embeds.npy"), "required file 'negative_image_embeds.npy'"),
    (lambda m: m.update(engines=[1]), "'engines' must be an object"),
    (lambda m: m.update(format_version="1"), "format_version must be a positive integer"),
])
def test_malformed_manifest_is_one_bundle_error(tiny_bundle_copy, change, message):
    _edit_manifest(tiny_bundle_copy, change)
    with pytest.raises(BundleError, match=message):
        open_bundle(tiny_bundle_copy)
