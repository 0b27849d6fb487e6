"""Writing a bundle's directory: the manifest last, modes for sharing, the finished directory
swapped in whole (an output directory only ever holds a complete bundle), tool versions."""

from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path

from eclipse_export import __version__
from eclipse_export.export.onnx_io import external_data_mismatch
from eclipse_export.export.options import ExportError
from eclipse_export.runtime.bundle import MANIFEST


def tool_versions() -> dict:
    out = {"eclipse_export": __version__}
    for dist in ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "tokenizers", "numpy",
                 "onnxconverter-common"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def publish(work: Path, manifest: dict, out: Path) -> None:
    mismatch = external_data_mismatch(work, manifest["components"], manifest["files"])
    if mismatch:  # a bundle the runtime would refuse is never published
        raise ExportError("graphs whose external data is not their files: " + "; ".join(mismatch))
    # The manifest is written last: a directory without one is never a bundle.
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _publish_modes(work)
    _replace_dir(work, out)


def _publish_modes(root: Path) -> None:
    """mkdtemp makes the directory 0700 and onnx writes external data 0600: give the bundle the
    ordinary permissions (umask) so that a service user can read what a build user exported."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace_dir(new: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)
