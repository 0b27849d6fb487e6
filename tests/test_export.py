"""Export writes complete, checked bundles atomically; graphs have the declared dynamic I/O."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from eclipse_export.export import exporter as export_mod
from eclipse_export.export.options import ExportError, ExportOptions
from eclipse_export.export.exporter import export_bundle, export_component
from eclipse_export.export.sources import RandomSource
from eclipse_export.families.kandinsky22.components import COMPONENTS
from eclipse_export.runtime.bundle import FORMAT_VERSION, open_bundle, sha256_file


def test_manifest_describes_every_file(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["precision"] == "fp32"
    assert manifest["source"]["preset"] == "tiny"
    for rel, entry in manifest["files"].items():
        assert sha256_file(tiny_bundle / rel) == entry["sha256"], rel
    for name in COMPONENTS:
        entry = manifest["components"][name]
        assert entry["graph"] in manifest["files"]
        assert all(s["failures"] == [] for s in entry["export_parity"]["stages"])
        assert len(entry["weights_sha256"]) == 64
    assert "tokenizer/tokenizer.json" in manifest["files"]
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(manifest["tools"])
    assert not list(tiny_bundle.parent.glob(".*partial*")), "no partial directory left behind"
    assert tiny_bundle.stat().st_mode & 0o055 == 0o055  # readable by others (umask 022), not mkdtemp's 0700


def test_graphs_have_declared_io_and_dynamic_axes(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    for name, spec in COMPONENTS.items():
        model = onnx.load(str(bundle.graph_path(name)), load_external_data=False)
        inputs = {i.name: i for i in model.graph.input}
        assert [i.name for i in model.graph.input] == spec.input_names
        assert [o.name for o in model.graph.output] == spec.output_names
        for t in spec.inputs:
            shape = inputs[t.name].type.tensor_type.shape.dim
            for axis, d in enumerate(shape):
                dynamic = axis in t.dynamic_axes()
                assert bool(d.dim_param) == dynamic, (name, t.name, axis)
                if not dynamic:
                    assert d.dim_value == t.resolve(dict(bundle.dims, B=1, h=1, w=1))[axis]


def test_negative_embedding_and_scheduler_are_shipped(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    neg = np.load(bundle.path("negative_image_embeds.npy"))
    assert neg.shape == (1, bundle.dims["D"]) and neg.dtype == np.float32 and np.abs(neg).sum() > 0
    assert bundle.json("scheduler_config.json")["_class_name"] == "DDPMScheduler"
    # the constant is the image encoder's embedding of a zeros image, recomputed here
    assert np.allclose(neg, RandomSource("tiny").negative_image_embeds(), atol=1e-6)


def test_large_graphs_use_one_external_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 1024)
    entry = export_component(RandomSource("tiny"), "prior", tmp_path, ExportOptions(), log=lambda m: None)
    assert entry["files"] == ["prior.onnx", "prior.onnx.data"]
    assert (tmp_path / "prior.onnx.data").stat().st_size > (tmp_path / "prior.onnx").stat().st_size
    assert all(not s["failures"] for s in entry["export_parity"]["stages"])  # ORT read the external data


def test_dynamo_exporter_matches_pytorch(tmp_path):
    entry = export_component(RandomSource("tiny"), "prior", tmp_path, ExportOptions(exporter="dynamo"), log=lambda m: None)
    assert entry["exporter"] == "dynamo"
    assert all(not s["failures"] for s in entry["export_parity"]["stages"])


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def boom(source, component, workdir, options, log):
        (workdir / "half-written.onnx").write_bytes(b"x")
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(export_mod, "export_component", boom)
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(RandomSource("tiny"), out, ExportOptions(), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(ExportError, match="--overwrite"):
        export_bundle(RandomSource("tiny"), tmp_path / "b", ExportOptions(), log=lambda m: None)


def test_learned_variance_scheduler_is_refused(tmp_path):
    source = RandomSource("tiny")
    source.configs["scheduler"]["variance_type"] = "learned_range"
    with pytest.raises(ExportError, match="variance"):
        export_bundle(source, tmp_path / "b", ExportOptions(), log=lambda m: None)
    assert not (tmp_path / "b").exists()


def test_external_data_ignores_the_current_directory(tmp_path, monkeypatch):
    """onnx's own exists-check looks at the cwd: an old prior.onnx.data there must not matter."""
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 1024)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prior.onnx.data").write_bytes(b"old")
    out = tmp_path / "new"
    out.mkdir()
    entry = export_component(RandomSource("tiny"), "prior", out, ExportOptions(), log=lambda m: None)
    assert entry["files"] == ["prior.onnx", "prior.onnx.data"]
    assert (tmp_path / "prior.onnx.data").read_bytes() == b"old"
