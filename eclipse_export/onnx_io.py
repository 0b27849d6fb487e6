"""Saving ONNX models with one external data file next to the graph."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def save_external(model, path: Path) -> list[str]:
    """Write `path` + `path.name`.data; returns both names.

    onnx checks whether the data file exists relative to the *current directory* rather than to
    the model (onnx 1.23: run an export from inside an old bundle and it refuses). Saving from
    the destination directory makes that check look at the right place.
    """
    import onnx

    path = Path(path).resolve()
    data = path.name + ".data"
    with _cwd(path.parent):
        onnx.save_model(model, path.name, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
    return [path.name, data]


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (multi-GB weights are only read), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
