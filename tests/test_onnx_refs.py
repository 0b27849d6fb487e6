"""A graph's external-data references (issue 23): the runtime's readers (runtime/onnx_refs.py and
cpp/src/core/onnx_refs.cpp) against the onnx package on every graph the tests export, and the
refusal, by both runtimes and before any backend is asked, of graphs whose references leave
their component's hash-verified files.

ONNX Runtime 1.20-1.23 follow `../x` and absolute locations; 1.24+ refuse them with their own
message. The refusals here must be the project's, whatever ONNX Runtime is installed.
"""

from __future__ import annotations

import ctypes as C
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

from eclipse_export.export import exporter as export_mod
from eclipse_export.export.options import ExportOptions
from eclipse_export.export.exporter import export_component
from eclipse_export.export.onnx_io import save_external
from eclipse_export.export.sources import RandomSource
from eclipse_export.runtime.bundle import BundleError, file_entry, open_bundle, trusted_bundle
from eclipse_export.runtime.onnx_refs import ORT_MEMORY_TAG, OnnxRefsError, external_data_refs
from eclipse_export.verify.cpp import ERR_BUNDLE, ROOT, load_library

GRAPH_NAMES = ("text_encoder", "prior", "unet", "movq")


# --- the readers against onnx ---------------------------------------------------------------------

def onnx_package_refs(path: Path) -> list[tuple]:
    """The onnx package's reading: every tensor it considers external (initializers, attribute
    tensors, subgraphs, functions), as (tensor, location, offset, length)."""
    model = onnx.load(str(path), load_external_data=False)
    out = []
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            out.append((t.name, info.location, info.offset or 0, info.length))
    return sorted(out)


def python_refs(path: Path) -> list[tuple]:
    return sorted((r.tensor, r.location, r.offset, r.length) for r in external_data_refs(path))


def cpp_tests_binary() -> Path:
    exe = Path(os.environ.get("ECLIPSE_BIN_DIR") or ROOT / "build" / "cpp") / "eclipse_tests"
    assert exe.is_file(), f"{exe} is missing: build the C++ runtime first (make cpp)"
    return exe


def cpp_refs(paths: list[Path]) -> dict[str, list[tuple] | str]:
    """The C++ reader's references per file (or its error), from `eclipse_tests --onnx-refs`."""
    done = subprocess.run([str(cpp_tests_binary()), "--onnx-refs", *map(str, paths)], capture_output=True,
                          text=True, timeout=300, check=True)
    out = {}
    for line in done.stdout.splitlines():
        row = json.loads(line)
        out[row["file"]] = row["error"] if "error" in row else sorted(tuple(r) for r in row["refs"])
    return out


def assert_readers_equal_onnx(paths: list[Path]) -> int:
    """Both readers give the onnx package's references on every file; returns how many there were."""
    from_cpp = cpp_refs(paths)
    total = 0
    for path in paths:
        want = onnx_package_refs(path)
        assert python_refs(path) == want, path
        assert from_cpp[str(path)] == want, path
        total += len(want)
    return total


def bundle_graphs(root: Path) -> list[Path]:
    manifest = json.loads((root / "manifest.json").read_text())
    return [root / manifest["components"][n]["graph"] for n in GRAPH_NAMES]


@pytest.mark.slow
def test_readers_equal_onnx_on_the_fp32_and_fp16_bundles(tiny_bundle, tiny_fp16_bundle):
    assert_readers_equal_onnx(bundle_graphs(tiny_bundle) + bundle_graphs(tiny_fp16_bundle))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "onnx-fp16"])
def test_readers_equal_onnx_on_a_unet_with_external_data(tmp_path, monkeypatch, target):
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 1024)
    entry = export_component(RandomSource("tiny"), "unet", tmp_path, ExportOptions(target=target, check_parity=False),
                             log=lambda m: None)
    assert entry["files"] == ["unet.onnx", "unet.onnx.data"]
    assert assert_readers_equal_onnx([tmp_path / "unet.onnx"]) > 10
    assert {r.location for r in external_data_refs(tmp_path / "unet.onnx")} == {"unet.onnx.data"}


def _pb_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _pb(number: int, payload: bytes) -> bytes:
    return _pb_varint(number << 3 | 2) + _pb_varint(len(payload)) + payload


def test_reader_finds_attribute_subgraph_and_function_tensors(tmp_path):
    """Every place a TensorProto can sit: initializers, Constant values, If branches' initializers,
    a local function's Constant; written by onnx, read by both readers."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    def external(name, location):
        t = numpy_helper.from_array(np.ones(4, np.float32), name)
        onnx.external_data_helper.set_external_data(t, location=location, offset=0, length=16)
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        return t

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    branch = helper.make_graph([helper.make_node("Identity", ["b"], ["y"])], "branch", [], [out],
                               [external("b", "branch.bin")])
    nodes = [helper.make_node("Constant", [], ["c"], value=external("c", "const.bin")),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [out],
                              [external("w", "w.bin")])
    fn = helper.make_function("local", "f", [], ["z"], [helper.make_node("Constant", [], ["z"], value=external("f", "fn.bin"))],
                              [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[fn])
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    assert assert_readers_equal_onnx([tmp_path / "m.onnx"]) == 5  # the branch counted once per If attribute


def test_malformed_protobuf_is_an_error_never_a_crash(tmp_path):
    tensor = _pb(8, b"w") + _pb(13, _pb(1, b"location") + _pb(2, b"w.bin")) + _pb_varint(14 << 3) + b"\x01"
    good = _pb_varint(1 << 3) + b"\x08" + _pb(7, _pb(5, tensor) + _pb(1, _pb(5, _pb(6, _pb(5, tensor)))))
    (tmp_path / "ok.onnx").write_bytes(good)
    assert [r.location for r in external_data_refs(tmp_path / "ok.onnx")] == ["w.bin", "w.bin"]
    cases = {"truncated": good[:-3], "long varint": b"\xff" * 11, "length past the end": _pb_varint(7 << 3 | 2) + b"\x90\x4e",
             "group": _pb_varint(7 << 3 | 3), "bad wire type": _pb_varint(7 << 3 | 6) + b"x",
             "two locations": _pb(7, _pb(5, _pb(13, _pb(1, b"location") + _pb(2, b"a")) * 2)),
             "no location": _pb(7, _pb(5, _pb_varint(14 << 3) + b"\x01")),
             "bad offset": _pb(7, _pb(5, _pb(13, _pb(1, b"location") + _pb(2, b"a")) + _pb(13, _pb(1, b"offset") + _pb(2, b"+1")))),
             # a loader opens the raw bytes; decoded with replacement they could match a listed name
             "not UTF-8": _pb(7, _pb(5, _pb(13, _pb(1, b"location") + _pb(2, b"a\xff")) + _pb_varint(14 << 3) + b"\x01")),
             "surrogate": _pb(7, _pb(5, _pb(13, _pb(1, b"location") + _pb(2, b"\xed\xa0\x80")))),
             "overlong": _pb(7, _pb(5, _pb(13, _pb(1, b"location") + _pb(2, b"\xc0\xae"))))}
    deep = _pb(5, tensor)
    for _ in range(40):  # subgraphs 40 deep: past protobuf's 100 levels
        deep = _pb(1, _pb(5, _pb(6, deep)))
    cases["deep"] = _pb(7, deep)
    for name, data in cases.items():
        (tmp_path / f"{name}.onnx").write_bytes(data)
        with pytest.raises(OnnxRefsError):
            external_data_refs(tmp_path / f"{name}.onnx")
    errors = cpp_refs([tmp_path / f"{name}.onnx" for name in cases])
    assert all(isinstance(e, str) for e in errors.values()), errors
    # every truncation and every single-byte change: references or OnnxRefsError, nothing else
    for n in range(len(good) + 1):
        try:
            external_data_refs_of(good[:n], tmp_path)
        except OnnxRefsError:
            pass
    for i in range(len(good)):
        for v in (0x00, 0x7F, 0x80, 0xFF, good[i] ^ 0x08):
            try:
                external_data_refs_of(good[:i] + bytes([v]) + good[i + 1:], tmp_path)
            except OnnxRefsError:
                pass


def external_data_refs_of(data: bytes, tmp_path: Path):
    (tmp_path / "x.onnx").write_bytes(data)
    return external_data_refs(tmp_path / "x.onnx")


# --- crafted bundles --------------------------------------------------------------------------------

def make_external(root: Path, component: str = "prior") -> None:
    """Store `component`'s weights as external data (as export does for graphs over 1 GiB) and
    record the data file in the manifest: a valid bundle the crafted cases start from."""
    graph = root / f"{component}.onnx"
    model = onnx.load(str(graph))
    graph.unlink()  # a hard link of the session's bundle: never write through it
    files = save_external(model, graph)
    m = json.loads((root / "manifest.json").read_text())
    m["components"][component]["files"] = files
    m["files"].update({rel: file_entry(root, rel) for rel in files})
    (root / "manifest.json").write_text(json.dumps(m))


def linked_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    (dst / "manifest.json").unlink()
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    return dst


def rewrite_graph(root: Path, component: str, edit) -> None:
    """What an attacker does: edit the graph's external-data entries, then re-hash the graph in
    the manifest (they write both)."""
    m = json.loads((root / "manifest.json").read_text())
    rel = m["components"][component]["graph"]
    model = onnx.load(str(root / rel), load_external_data=False)
    edit(model)
    (root / rel).unlink()  # break the hard link
    onnx.save_model(model, str(root / rel))
    m["files"][rel] = file_entry(root, rel)
    (root / "manifest.json").write_text(json.dumps(m))


def set_external(tensor, **values) -> None:
    entries = {kv.key: kv.value for kv in tensor.external_data}
    entries.update({k: str(v) for k, v in values.items() if v is not None})
    for k in [k for k, v in values.items() if v is None]:
        entries.pop(k, None)
    del tensor.external_data[:]
    for k, v in entries.items():
        tensor.external_data.add(key=k, value=v)


def first_external(model):
    return next(t for t in model.graph.initializer if uses_external_data(t))


@pytest.fixture(scope="module")
def external_bundle(tiny_bundle, tmp_path_factory) -> Path:
    root = linked_copy(tiny_bundle, tmp_path_factory.mktemp("external") / "bundle")
    make_external(root, "prior")
    open_bundle(root)  # valid as made
    return root


def _craft(case: str, root: Path, outside: Path) -> None:
    secret = outside / "secret.bin"
    secret.write_bytes(os.urandom(1 << 20))
    data_size = (root / "prior.onnx.data").stat().st_size

    def location(value):
        return lambda model: set_external(first_external(model), location=value)

    if case == "dot-dot":
        edit = location("../outside/secret.bin")
    elif case == "absolute":
        edit = location(str(secret))
    elif case == "symlink out":
        (root / "link.bin").symlink_to(secret)
        edit = location("link.bin")
    elif case == "unlisted file inside":
        shutil.copy(root / "prior.onnx.data", root / "stolen.bin")
        edit = location("stolen.bin")
    elif case == "another component's file":
        edit = location("movq.onnx")
    elif case == "offset past the end":
        edit = lambda model: set_external(first_external(model), offset=data_size, length=16)  # noqa: E731
    elif case == "length past the end":
        edit = lambda model: set_external(first_external(model), offset=0, length=data_size + 1)  # noqa: E731
    elif case == "ORT memory tag":
        edit = location(ORT_MEMORY_TAG)
    elif case == "unused listed file":
        data = (root / "prior.onnx.data").read_bytes()  # (onnx refuses hard-linked data files)

        def edit(model):  # every tensor inline again: the listed data file is not the graph's
            for t in model.graph.initializer:
                if uses_external_data(t):
                    info = ExternalDataInfo(t)
                    t.raw_data = data[info.offset:info.offset + info.length]
                    t.data_location = onnx.TensorProto.DEFAULT
                    del t.external_data[:]
    else:
        raise AssertionError(case)
    rewrite_graph(root, "prior", edit)


CRAFTED = {
    "dot-dot": r"names external data '\.\./outside/secret\.bin', which is not a plain relative path",
    "absolute": r"names external data '/[^']*', which is absolute",  # (cut at 80 characters)
    "symlink out": r"names external data 'link\.bin', which is not one of prior's external data files \['prior\.onnx\.data'\]",
    "unlisted file inside": r"names external data 'stolen\.bin', which is not one of prior's external data files",
    "another component's file": r"names external data 'movq\.onnx', which is not one of prior's .*\(it is movq's\)",
    "offset past the end": r"at offset \d+ \(16 bytes\), past the end of its \d+ bytes",
    "length past the end": r"at offset 0 \(\d+ bytes\), past the end of its \d+ bytes",
    "ORT memory tag": r"which is ONNX Runtime's in-memory address tag",
    "unused listed file": r"components\.prior\.files lists \['prior\.onnx\.data'\], which its graph does not use",
}


@pytest.fixture()
def no_ort_session(monkeypatch):
    """Fails any ONNX Runtime session creation: a refusal must come before the backend."""
    import onnxruntime

    asked = []

    def refuse(*args, **kwargs):
        asked.append(args[0] if args else kwargs)
        raise AssertionError("ONNX Runtime was asked to load a graph")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    return asked


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_graphs_are_refused_by_both_runtimes_before_any_backend(external_bundle, tmp_path, case, no_ort_session):
    from eclipse_export.runtime.pipeline import Pipeline

    root, outside = linked_copy(external_bundle, tmp_path / "bundle"), tmp_path / "outside"
    outside.mkdir()
    _craft(case, root, outside)
    pattern = r"the prior graph prior\.onnx cannot be loaded: .*" + CRAFTED[case]
    with pytest.raises(BundleError, match=pattern) as refused:
        Pipeline.from_bundle(root)
    assert not no_ort_session and "escapes model directory" not in str(refused.value)
    # the size-only check (--skip-hash-check) reads the references all the same
    with pytest.raises(BundleError, match=pattern):
        open_bundle(root, verify_hashes=False)
    # the C library: refused when the bundle opens, so no backend (ONNX Runtime, TensorRT's
    # parser, a custom table) is ever given the graph
    lib = load_library()
    for verify in (1, 0):
        b = C.c_void_p()
        assert lib.eclipse_bundle_open(str(root).encode(), verify, C.byref(b)) == ERR_BUNDLE and not b
        message = lib.eclipse_last_error().decode()
        assert re.search(pattern, message), message


def test_graph_path_checks_bundles_built_in_memory(tmp_path, no_ort_session):
    """Bundles that skip open_bundle (export's calibration pass) are checked when a backend asks
    for the graph: the ONNX Runtime backend never sees an escaping reference."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from eclipse_export.families.kandinsky22.components import COMPONENTS
    from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend

    (tmp_path / "b").mkdir()
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    files = save_external(model, tmp_path / "b" / "g.onnx")
    (tmp_path / "b" / files[1]).rename(tmp_path / "g.data")
    model = onnx.load(str(tmp_path / "b" / "g.onnx"), load_external_data=False)
    for location, why in (("../g.data", "not a plain relative path"), (str(tmp_path / "g.data"), "is absolute")):
        set_external(model.graph.initializer[0], location=location)
        onnx.save_model(model, str(tmp_path / "b" / "g.onnx"))
        bundle = trusted_bundle(tmp_path / "b", {"components": {"prior": {"graph": "g.onnx", "files": ["g.onnx"]}},
                                                 "dims": {}}, ["g.onnx"])
        with pytest.raises(BundleError, match=f"the prior graph g.onnx cannot be loaded: .*{why}"):
            OnnxRuntimeBackend().load(COMPONENTS["prior"], bundle)
    assert not no_ort_session


# --- the export side ------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_never_publishes_a_graph_whose_files_are_not_its_external_data(tmp_path, monkeypatch):
    """`files` is the exact record of a graph's external data: an exporter that forgot the data
    file (here: _finalise reporting the graph alone) fails, and leaves nothing."""
    from eclipse_export.export.options import ExportError
    from eclipse_export.export.exporter import export_bundle

    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 1024 * 1024)  # the tiny UNet and text encoder only
    finalise = export_mod._finalise
    monkeypatch.setattr(export_mod, "_finalise", lambda raw, final, external: finalise(raw, final, external)[:1])
    out = tmp_path / "b"
    with pytest.raises(ExportError, match=r"names external data '(unet|text_encoder)\.onnx\.data', which is not one of"):
        export_bundle(RandomSource("tiny"), out, ExportOptions(check_parity=False), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_building_from_a_crafted_bundle_is_refused_before_any_parser(external_bundle, tmp_path, capsys):
    """--from-bundle (engines, INT8) opens the shipped bundle first: a crafted graph is one
    error line, exit status 2, before TensorRT's parser or onnx follow its references."""
    from eclipse_export.cli.common import EXIT_USAGE, _run
    from eclipse_export.cli.export import export_main

    root, outside = linked_copy(external_bundle, tmp_path / "bundle"), tmp_path / "outside"
    outside.mkdir()
    _craft("dot-dot", root, outside)
    for target in ("onnx-int8", "trt-rtx-fp16"):
        rc = _run(export_main, ["--from-bundle", str(root), "--target", target, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == EXIT_USAGE and re.search(CRAFTED["dot-dot"], err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_step_graphs_may_not_name_external_data(tiny_bundle, tmp_path, no_ort_session):
    """The device loop's step graphs are bundle files ONNX Runtime loads too: they hold no
    external data, so any reference is refused, in both runtimes, when the bundle opens."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    root, outside = linked_copy(tiny_bundle, tmp_path / "bundle"), tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(bytes(64))
    m = json.loads((root / "manifest.json").read_text())
    rel = m["step_graphs"]["cfg"]
    w = numpy_helper.from_array(np.zeros(16, np.float32), "w")
    set_external(w, location="../outside/secret.bin", offset=0, length=64)
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])], [w])
    (root / rel).unlink()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / rel))
    m["files"][rel] = file_entry(root, rel)
    (root / "manifest.json").write_text(json.dumps(m))
    pattern = (rf"the step_graphs\.cfg graph {re.escape(rel)} cannot be loaded: tensor 'w' names external data "
               r"'\.\./outside/secret\.bin', which is not a plain relative path")
    with pytest.raises(BundleError, match=pattern):
        open_bundle(root)
    assert not no_ort_session
    lib = load_library()
    b = C.c_void_p()
    assert lib.eclipse_bundle_open(str(root).encode(), 1, C.byref(b)) == ERR_BUNDLE
    assert re.search(pattern, lib.eclipse_last_error().decode()), lib.eclipse_last_error()
