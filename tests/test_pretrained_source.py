"""The real-checkpoint loading path (kandinsky22), on local directories laid out like the hub
repositories and filled with tiny random-weight models (the hub is unreachable here)."""

from __future__ import annotations

import json
import shutil

import pytest

from eclipse_export.export.options import ExportOptions
from eclipse_export.export.exporter import export_bundle
from eclipse_export.export.sources import RandomSource, SourceError, make_source
from eclipse_export.export.tokenizer_files import write_tokenizer_files
from eclipse_export.runtime.bundle import open_bundle


@pytest.fixture(scope="module")
def hub_like(tmp_path_factory):
    """prior/, bigG/ (text model + tokenizer), decoder/{unet,movq,scheduler}, k22prior/image_encoder."""
    root = tmp_path_factory.mktemp("hub")
    tiny = RandomSource("tiny", seed=5)
    tiny.load("prior").save_pretrained(root / "prior")
    tiny.load("text_encoder").save_pretrained(root / "bigG")
    write_tokenizer_files(root / "bigG", None)
    tiny.load("unet").save_pretrained(root / "decoder" / "unet")
    tiny.load("movq").save_pretrained(root / "decoder" / "movq")
    (root / "decoder" / "scheduler").mkdir(parents=True)
    # a re-saved revision of the real config: clip_sample true
    scheduler = dict(tiny.configs["scheduler"], clip_sample=True)
    (root / "decoder" / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    tiny.load("image_encoder").save_pretrained(root / "k22prior" / "image_encoder")
    return root


def _locations(root):
    return {"prior": str(root / "prior"), "text_encoder": str(root / "bigG"), "tokenizer": str(root / "bigG"),
            "unet": str(root / "decoder"), "movq": str(root / "decoder"), "scheduler": str(root / "decoder"),
            "image_encoder": str(root / "k22prior")}


def test_export_and_compare_from_local_checkpoints(hub_like, tmp_path):
    from eclipse_export.runtime.pipeline import Pipeline
    from eclipse_export.verify.compare import compare_with_reference

    source = make_source("kandinsky22", locations=_locations(hub_like))
    out = export_bundle(source, tmp_path / "k22", ExportOptions(), log=lambda m: None)
    bundle = open_bundle(out)
    assert bundle.manifest["source"]["kind"] == "pretrained"
    assert bundle.manifest["source"]["components"]["unet"]["subfolder"] == "unet"
    assert bundle.json("scheduler_config.json")["clip_sample"] is True  # the checkpoint's, not a constant

    pipeline = Pipeline.from_bundle(out)
    gen = pipeline.generate("a red cube on a blue sphere", height=64, width=64, steps=3, record=True)
    report, _ = compare_with_reference(pipeline, gen)
    assert report.ok, report.table()


def test_pickled_weights_need_opt_in(hub_like, tmp_path):
    root = tmp_path / "hub"
    shutil.copytree(hub_like, root)
    unet_dir = root / "decoder" / "unet"
    for f in unet_dir.glob("*.safetensors"):
        f.unlink()
    RandomSource("tiny").load("unet").save_pretrained(unet_dir, safe_serialization=False)
    source = make_source("kandinsky22", locations=_locations(root))
    with pytest.raises(SourceError, match="--allow-pickle"):
        source.load("unet")
    unet = make_source("kandinsky22", locations=_locations(root), allow_pickle=True).load("unet")
    assert unet.config.in_channels == 4


def test_missing_local_directory_is_reported_before_any_download(tmp_path):
    with pytest.raises(SourceError, match="prior: .* is not a directory"):
        make_source("kandinsky22", locations={"prior": str(tmp_path / "nope")})
