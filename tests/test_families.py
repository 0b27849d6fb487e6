"""Model families as data (issue 17): the chain is the family's data plus one driver, the
manifest names the family, both runtimes pick the chain from it and refuse a family they do not
know, and bundles of format 1 (before families and step graphs) keep working."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from eclipse_export.families import FAMILIES, Family, Stage, UnknownFamily, family_of_preset, get_family
from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend
from eclipse_export.runtime.bundle import FORMAT_VERSION, BundleError, file_entry, open_bundle
from eclipse_export.runtime.chains import DRIVERS
from eclipse_export.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_has_a_driver_and_a_cpp_twin():
    assert set(DRIVERS) == set(FAMILIES)
    # cpp/src/core/families.cpp: {"name", {components}, {dims}, {required files}}
    text = (ROOT / "cpp/src/core/families.cpp").read_text()
    entries = re.findall(r'\{"(\w+)",\s*\{([^}]*)\},\s*\{([^}]*)\},\s*\{([^}]*)\}\}', text)
    strings = lambda group: tuple(re.findall(r'"([^"]+)"', group))  # noqa: E731
    cpp = {name: (strings(c), strings(d), strings(f)) for name, c, d, f in entries}
    assert cpp == {f.name: (tuple(f.components), f.dim_names, f.required_files) for f in FAMILIES.values()}


def test_a_chain_that_does_not_fit_its_components_is_refused():
    k22 = get_family("kandinsky22")
    with pytest.raises(ValueError, match="the chain calls"):
        Family("x", "x", k22.components, k22.chain[:3], k22.dim_names, k22.required_files, ())
    wrong = (Stage("text_encoder", {"ids": "tokens.input_ids"}), *k22.chain[1:])
    with pytest.raises(ValueError, match="the graph takes"):
        Family("x", "x", k22.components, wrong, k22.dim_names, k22.required_files, ())


def test_presets_name_their_family():
    assert family_of_preset("tiny").name == "kandinsky22"
    with pytest.raises(UnknownFamily, match="unknown preset 'nope'"):
        family_of_preset("nope")


def test_bundles_name_their_family(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    assert bundle.manifest["format_version"] == FORMAT_VERSION == 2
    assert bundle.manifest["family"] == "kandinsky22" and bundle.family is FAMILIES["kandinsky22"]


def test_an_unknown_family_is_refused(tiny_bundle_copy):
    m = json.loads((tiny_bundle_copy / "manifest.json").read_text())
    m["family"] = "stable-cascade"
    (tiny_bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="model family 'stable-cascade' is not known to this version of "
                                          r"eclipse-export \(it knows kandinsky22, lambda, karlo\); upgrade eclipse-export"):
        open_bundle(tiny_bundle_copy)
    del m["family"]  # format 2 requires one
    (tiny_bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="model family None is not known"):
        open_bundle(tiny_bundle_copy)


def _as_format_1(src: Path, dst: Path) -> Path:
    """The bundle as exports before families wrote it: no family, no step graphs, format 1."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for rel in m.pop("step_graphs").values():
        del m["files"][rel]
        (dst / rel).unlink()
    del m["family"]
    m["format_version"] = 1
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_format_1_bundles_still_run(tiny_bundle, tiny_pipeline, tmp_path):
    """A bundle of today's main before this change opens as Kandinsky 2.2 and gives the same image;
    the ONNX Runtime device loop, which needs the step graphs, falls back to the host loop with a
    note that says how to add them (`--from-bundle` with the bundle's own target)."""
    old = _as_format_1(tiny_bundle, tmp_path / "v1")
    assert open_bundle(old).family.name == "kandinsky22"
    kw = dict(height=64, width=64, steps=3, seed=5)
    want = tiny_pipeline.generate("a red cube", **kw).images
    backend = OnnxRuntimeBackend(device_loop=True, cuda_graphs=False)  # same kernels as the host loop: exact
    got = Pipeline.from_bundle(old, backend).generate("a red cube", **kw).images
    np.testing.assert_array_equal(got, want)
    assert backend.device_loop is False
    assert any("has no step graphs" in n and "--from-bundle" in n for n in backend.notes)


@pytest.mark.slow
def test_from_bundle_repackages_a_format_1_bundle(tiny_bundle, tiny_pipeline, tmp_path):
    from eclipse_export.export.derive import build_engines_for_bundle

    old = _as_format_1(tiny_bundle, tmp_path / "v1")
    new = build_engines_for_bundle(old, tmp_path / "v2", "onnx", None, log=lambda m: None)
    bundle = open_bundle(new)
    assert bundle.manifest["format_version"] == FORMAT_VERSION and bundle.manifest["family"] == "kandinsky22"
    for kind in ("cfg", "plain"):
        rel = bundle.manifest["step_graphs"][kind]
        assert bundle.manifest["files"][rel] == file_entry(new, rel)
    backend = OnnxRuntimeBackend(device_loop=True, cuda_graphs=False)  # same kernels as the host loop: exact
    kw = dict(height=64, width=64, steps=3, seed=5)
    got = Pipeline.from_bundle(new, backend).generate("a red cube", **kw).images
    np.testing.assert_array_equal(got, tiny_pipeline.generate("a red cube", **kw).images)
    assert backend.device_loop is True and not backend.notes


def test_the_cpp_library_reads_format_1_bundles(tiny_bundle, tiny_pipeline, tmp_path):
    from eclipse_export.verify.cpp import OrtGraphs, Runtime, load_library

    try:
        lib = load_library()
    except (OSError, FileNotFoundError) as e:
        pytest.skip(f"build/cpp is not built ({e}); make test builds it")
    old = _as_format_1(tiny_bundle, tmp_path / "v1")
    graphs = OrtGraphs()  # its ctypes callbacks must outlive the library objects that call them
    rt = Runtime(lib, old, graphs.table)
    try:
        got = rt.generate("a red cube", height=64, width=64, steps=3, seed=5)
    finally:
        rt.close()
    want = tiny_pipeline.generate("a red cube", height=64, width=64, steps=3, seed=5).images[0]
    np.testing.assert_array_equal(got["image"], want)
