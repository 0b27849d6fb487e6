"""Shared fixtures: one tiny bundle per test session (exported once, read-only for tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from eclipse_export.export import ExportOptions, export_bundle
    from eclipse_export.sources import RandomSource

    out = tmp_path_factory.mktemp("bundles") / "tiny-onnx"
    export_bundle(RandomSource("tiny"), out, ExportOptions(), log=lambda m: None)
    return out


@pytest.fixture()
def tiny_bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy for tests that damage a bundle."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_bundle):
    from eclipse_export.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(tiny_bundle)


@pytest.fixture(scope="session")
def tiny_fp16_bundle(tmp_path_factory) -> Path:
    from eclipse_export.export import ExportOptions, export_bundle
    from eclipse_export.sources import RandomSource

    out = tmp_path_factory.mktemp("bundles") / "tiny-onnx-fp16"
    export_bundle(RandomSource("tiny"), out, ExportOptions(target="onnx-fp16"), log=lambda m: None)
    return out
