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


# Offsets of large tensors in the external data file are multiples of this, so ONNX Runtime can
# memory-map them instead of reading them into its heap (it maps only aligned offsets; 64 KiB is
# Windows' allocation granularity and a multiple of every page size): the weights of a loaded
# graph are then the file's pages, shared with the page cache, not a private copy.
ALIGNMENT = 64 * 1024
# tensors smaller than this are packed without padding (ORT reads those; padding would waste more)
ALIGN_THRESHOLD = 64 * 1024
INLINE_THRESHOLD = 1024  # tensors under this stay inside the graph file (as onnx.save_model does)


def save_external(model, path: Path) -> list[str]:
    """Write `path` + `path.name`.data (weights with aligned offsets, see ALIGNMENT); returns both
    names. The model proto loses its raw weight bytes on the way (they move to the data file).

    onnx 1.23's own writer cannot align offsets, and it checks whether the data file exists
    relative to the *current directory* rather than to the model, so this writes the data file
    itself and saves the (small) graph from the destination directory."""
    import onnx
    from onnx.external_data_helper import set_external_data

    path = Path(path).resolve()
    data = path.name + ".data"
    with open(path.parent / data, "wb") as f:
        for tensor in _all_tensors(model):
            raw = tensor.raw_data
            if len(raw) < INLINE_THRESHOLD:
                continue
            offset = f.tell()
            if len(raw) >= ALIGN_THRESHOLD and offset % ALIGNMENT:
                f.write(bytes(ALIGNMENT - offset % ALIGNMENT))
                offset = f.tell()
            f.write(raw)
            set_external_data(tensor, location=data, offset=offset, length=len(raw))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
    with _cwd(path.parent):
        onnx.save_model(model, path.name)
    return [path.name, data]


def _all_tensors(model):
    """Initializers of the graph and of its subgraphs (If/Loop bodies), in graph order;
    Constant nodes' tensors stay in the graph, as with onnx.save_model's default."""
    def walk(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from walk(attr.g)
                for g in attr.graphs:
                    yield from walk(g)

    return [t for t in walk(model.graph) if t.HasField("raw_data")]


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (multi-GB weights are only read), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def external_data_mismatch(root: Path, components: dict, files) -> list[str]:
    """How the graphs under `root` break the runtime's rule for external data (runtime/bundle.py's
    external_data_problems: each component's `files` minus its graph is exactly the set of files
    its graph references, every reference inside them). Export checks it before handing graphs
    to TensorRT's parser and before publishing, so every bundle it writes opens, and `files` is
    the exact record of each graph's external data."""
    from eclipse_export.runtime.bundle import BundleError, external_data_problems, trusted_bundle

    bundle = trusted_bundle(Path(root), {"components": components}, files)
    problems = []
    for name in components:
        try:
            problems += [f"{name}: {p}" for p in external_data_problems(bundle, name)]
        except BundleError as e:  # a graph or data file missing from `files`
            problems.append(f"{name}: {e}")
    return problems


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
