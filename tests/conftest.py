"""Shared fixtures: one tiny bundle per test session (exported once, read-only for tests)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.sources import RandomSource

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
def tiny_karlo_bundle(tmp_path_factory) -> Path:
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.source_factory import make_source

    out = tmp_path_factory.mktemp("bundles") / "tiny-karlo-onnx"
    export_bundle(make_source("tiny-karlo"), out, ExportOptions(), log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tiny_lambda_bundle(tmp_path_factory) -> Path:
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.sources import RandomSource

    out = tmp_path_factory.mktemp("bundles") / "tiny-lambda-onnx"
    export_bundle(RandomSource("tiny-lambda"), out, ExportOptions(), log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tiny_fp16_bundle(tmp_path_factory) -> Path:
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.export.options import ExportOptions
    from eclipse_export.export.sources import RandomSource

    out = tmp_path_factory.mktemp("bundles") / "tiny-onnx-fp16"
    export_bundle(RandomSource("tiny"), out, ExportOptions(target="onnx-fp16"), log=lambda m: None)
    return out


def console_script(name: str) -> str:
    """An installed console script of this package: next to the interpreter running the tests
    (the venv's bin/, whether or not it is on PATH), else on PATH. Missing is a failure, not a
    skip: `make test` must run every test that CI runs."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"console script {name} is not installed (pip install -e .)"
    return found


@pytest.fixture(scope="module")
def cuda():
    """The runtime's Cuda on device 0, for GPU tests (skips without a GPU, fails where the GPU
    window requires one: tests/gpu_required.py)."""
    from eclipse_export.runtime.backends.cuda import Cuda

    from .gpu_required import cuda_reason, need

    need("cuda", cuda_reason())
    c = Cuda(0)
    yield c
    c.close()
