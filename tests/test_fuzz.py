"""Fuzzing what users and files feed in (hypothesis): manifests, prompts, CLI arguments.

Each property runs a bounded number of generated cases (FUZZ_EXAMPLES, printed in the test
names' ids) with no per-case deadline, so CI time stays fixed; hypothesis shrinks any failure to
a minimal case and prints it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eclipse_export.cli.common import EXIT_USAGE, _run
from eclipse_export.cli.export import export_main
from eclipse_export.cli.generate import generate_main
from eclipse_export.export.engines import RTX_COMPUTE_CAPABILITIES as RTX_CCS
from eclipse_export.export.options import EXPORTERS, MAX_OPSET, MIN_OPSET, TARGETS
from eclipse_export.families.kandinsky22.presets import ALL_PRESETS
from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend
from eclipse_export.runtime.bundle import BundleError, open_bundle
from eclipse_export.runtime.pipeline import Pipeline

# Cases per property and run; raise with ECLIPSE_FUZZ_EXAMPLES for a longer local campaign.
FUZZ_EXAMPLES = int(os.environ.get("ECLIPSE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# --- manifests ------------------------------------------------------------------------------------

# Values a broken or hostile manifest may hold: wrong types, huge and negative numbers, NaN, paths
# that escape, names of real files in the wrong place.
PATHS = st.sampled_from(["/etc/passwd", "../manifest.json", "../../x.onnx", "prior.onnx", "unet.onnx",
                         "tokenizer/../prior.onnx", "tokenizer", "", ".", "a\\b", "C:/x", "manifest.json",
                         "negative_image_embeds.npy", "tokenizer/tokenizer.json", "x" * 300])
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), PATHS)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6)


def _locations(node, prefix=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _locations(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _locations(v, prefix + (i,))


@st.composite
def mutated_manifests(draw, manifest: dict):
    m = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        spots = [p for p, _ in _locations(m) if p]
        path = draw(st.sampled_from(spots))
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["replace", "delete", "path", "rename"]))
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(PATHS)] = parent.pop(key)
        elif op == "path":
            parent[key] = draw(PATHS)
        else:
            parent[key] = draw(JSON_VALUES)
    return m


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle, tmp_path_factory):
    """A copy whose manifest each case rewrites (the graphs are hard links: read-only use)."""
    dst = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(tiny_bundle, dst, copy_function=os.link)
    (dst / "manifest.json").unlink()
    return dst, json.loads((tiny_bundle / "manifest.json").read_text())


def test_mutated_manifests_give_a_bundle_error_never_a_traceback(fuzz_bundle):
    root, valid = fuzz_bundle
    backend = OnnxRuntimeBackend()
    outcomes = {"refused": 0, "ran": 0}

    @FUZZ
    @given(mutated_manifests(valid))
    def case(manifest):
        # allow_nan: json.loads accepts NaN/Infinity, so a manifest may hold them
        (root / "manifest.json").write_text(json.dumps(manifest, allow_nan=True))
        try:
            pipeline = Pipeline(open_bundle(root), backend)
            gen = pipeline.generate("a cat", height=64, width=64, steps=1, guidance_scale=2.0)
        except BundleError:
            outcomes["refused"] += 1
            return
        assert gen.images.shape == (1, 64, 64, 3)  # a harmless mutation (a timestamp, a note)
        outcomes["ran"] += 1

    case()
    print(f"manifest fuzz: {outcomes}")
    assert outcomes["refused"] > FUZZ_EXAMPLES // 4  # the mutations reach what the runtime reads


# --- graphs: external-data references (issue 23) --------------------------------------------------

# What a crafted graph may name as its external data; the attacker re-hashes the graph in the
# manifest, so only the runtime's reading of the references stands between them and the disk.
GRAPH_LOCATIONS = st.one_of(st.sampled_from([
    "prior.onnx.data", "../outside/secret.bin", "{outside}/secret.bin", "link.bin", "stolen.bin", "movq.onnx",
    "prior.onnx", "manifest.json", "tokenizer/tokenizer.json", "*/_ORT_MEM_ADDR_/*", "./prior.onnx.data",
    "tokenizer/../prior.onnx.data", "", "/prior.onnx.data", "prior.onnx.data/", "a\\b", "C:/x"]),
    st.text(max_size=12))
GRAPH_COUNTS = st.one_of(st.integers(-3, 1 << 20).map(str), st.integers(0, 2**70).map(str),
                         st.sampled_from(["", "+1", " 1", "1e3", "0x10", "١"]))


@st.composite
def graph_mutations(draw):
    """1-3 edits of the external-data entries of the prior's initializers (by index)."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["location", "location", "offset", "length", "drop", "duplicate", "inline"]))
        value = None
        if op == "location":
            value = draw(GRAPH_LOCATIONS)
        elif op in ("offset", "length"):
            value = draw(GRAPH_COUNTS)
        elif op in ("drop", "duplicate"):
            value = draw(st.sampled_from(["location", "offset", "length"]))
        edits.append((draw(st.integers(0, 50)), op, value))
    return edits


def apply_graph_mutation(root, edits, outside) -> None:
    """Edit prior.onnx's external data as `edits` say and re-hash it in the manifest."""
    import onnx

    from .test_onnx_refs import rewrite_graph

    def edit(model):
        tensors = [t for t in model.graph.initializer if t.external_data]
        for index, op, value in edits:
            t = tensors[index % len(tensors)]
            entries = [(kv.key, kv.value) for kv in t.external_data]
            if op == "location" or op in ("offset", "length"):
                key = op
                value = value.replace("{outside}", str(outside)) if op == "location" else value
                entries = [(k, v) for k, v in entries if k != key] + [(key, value)]
            elif op == "drop":
                entries = [(k, v) for k, v in entries if k != value]
            elif op == "duplicate":
                entries += [(k, v) for k, v in entries if k == value]
            elif op == "inline":  # data_location DEFAULT, entries kept (loaders then ignore them)
                t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
            for k, v in entries:
                t.external_data.add(key=k, value=v)

    rewrite_graph(root, "prior", edit)


def must_refuse(root) -> bool:
    """The onnx package's reading of prior.onnx: does a tensor it would load from a file name
    anything but a range of prior.onnx.data?"""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    size = (root / "prior.onnx.data").stat().st_size
    model = onnx.load(str(root / "prior.onnx"), load_external_data=False)
    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        info = {}
        for kv in t.external_data:
            info.setdefault(kv.key, []).append(kv.value)
        if info.get("location") != ["prior.onnx.data"]:
            return True
        offset, length = info.get("offset", ["0"]), info.get("length", ["0"])  # no length: to the end
        if len(offset) > 1 or len(length) > 1 or not (offset[0].isascii() and offset[0].isdigit()) \
                or not (length[0].isascii() and length[0].isdigit()) or int(offset[0]) + int(length[0]) > size:
            return True
    return False


@pytest.fixture(scope="module")
def graph_fuzz_bundle(tiny_bundle, tmp_path_factory):
    """A copy whose prior keeps its weights in prior.onnx.data (valid as made), a secret file
    outside it, a symlink out and an unlisted copy of the data inside."""
    from .test_onnx_refs import linked_copy, make_external

    base = tmp_path_factory.mktemp("graph-fuzz")
    root = linked_copy(tiny_bundle, base / "bundle")
    make_external(root, "prior")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(os.urandom(1 << 20))
    (root / "link.bin").symlink_to(outside / "secret.bin")
    shutil.copy(root / "prior.onnx.data", root / "stolen.bin")
    return root, outside, (root / "prior.onnx").read_bytes(), (root / "manifest.json").read_text()


def restore(root, graph: bytes, manifest: str) -> None:
    (root / "prior.onnx").unlink()
    (root / "prior.onnx").write_bytes(graph)
    (root / "manifest.json").write_text(manifest)


def test_crafted_external_data_gives_the_projects_bundle_error(graph_fuzz_bundle, monkeypatch):
    """Rewritten references in an exported graph, re-hashed in the manifest: whatever the onnx
    package would read from outside prior.onnx.data is refused with the project's message before
    ONNX Runtime is asked; what passes runs (reading only the listed file)."""
    import onnxruntime

    root, outside, graph, manifest = graph_fuzz_bundle
    backend = OnnxRuntimeBackend()
    outcomes = {"refused": 0, "ran": 0, "ort refused": 0}
    sessions = []
    real_session = onnxruntime.InferenceSession

    def session(*args, **kwargs):
        sessions.append(args[0])
        return real_session(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)

    @FUZZ
    @given(graph_mutations())
    def case(edits):
        restore(root, graph, manifest)
        apply_graph_mutation(root, edits, outside)
        sessions.clear()
        try:
            bundle = open_bundle(root)
        except BundleError as e:
            assert "the prior graph prior.onnx cannot be loaded" in str(e) and not sessions, e
            outcomes["refused"] += 1
            return
        assert not must_refuse(root), edits
        try:  # valid references into the listed file (maybe to the wrong bytes): ORT may still object
            gen = Pipeline(bundle, backend).generate("a cat", height=64, width=64, steps=1, guidance_scale=2.0)
        except BundleError:
            outcomes["ort refused"] += 1
            return
        assert gen.images.shape == (1, 64, 64, 3)
        outcomes["ran"] += 1

    try:
        case()
    finally:
        restore(root, graph, manifest)
    print(f"graph fuzz: {outcomes}")
    assert outcomes["refused"] > FUZZ_EXAMPLES // 2 and outcomes["ran"] > 0


# --- prompts --------------------------------------------------------------------------------------

# Any Unicode scalar value except surrogates (not encodable in UTF-8, so not a prompt a user can
# send), weighted towards the awkward: combining marks, CJK, emoji, controls, exotic spaces.
AWKWARD = st.sampled_from(list("\u0301\u0308\u200b\u200d\ufeff\u00a0\u3000\u2028\t\r\n\x00\x1f\x7f"
                               "é漢字あア한🐱❤️👩‍👩‍👧ﬁＦß İ!&;'") + ["&amp;", "&lt;b&gt;", "<|endoftext|>",
                                                                  "<|startoftext|>", "don't", "    "])
PROMPTS = st.lists(st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=12), AWKWARD),
                   max_size=30).map("".join)


@pytest.fixture(scope="module")
def tokenizers(tiny_bundle):
    from transformers import CLIPTokenizer

    from eclipse_export.runtime.tokenizer import ClipTokenizer

    return ClipTokenizer.from_dir(tiny_bundle / "tokenizer"), CLIPTokenizer.from_pretrained(tiny_bundle / "tokenizer")


def test_any_unicode_prompt_tokenizes_like_transformers(tokenizers):
    ours, ref = tokenizers

    @FUZZ
    @given(PROMPTS)
    def case(prompt):
        got = ours([prompt])
        want = ref([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="np")
        assert got.input_ids[0].tolist() == want["input_ids"][0].tolist()
        assert got.attention_mask[0].tolist() == want["attention_mask"][0].tolist()

    case()


# --- CLI arguments --------------------------------------------------------------------------------

def _bad_size():
    return st.one_of(st.integers(-10**6, 63), st.integers(2049, 10**9),
                     st.integers(64, 2048).filter(lambda v: v % 64))


BAD_GENERATE_ARGS = st.one_of(
    st.tuples(st.just("--height"), _bad_size().map(str)),
    st.tuples(st.just("--width"), _bad_size().map(str)),
    st.tuples(st.just("--steps"), st.integers(-10**6, 0).map(str)),
    st.tuples(st.just("--seed"), st.one_of(st.integers(-10**20, -1), st.integers(2**64, 2**80)).map(str)),
    st.tuples(st.just("--guidance"), st.sampled_from(["nan", "inf", "-inf", "NaN", "1e400"])),
    st.tuples(st.just("--threads"), st.integers(-100, 0).map(str)),
    st.tuples(st.sampled_from(["--height", "--width", "--steps", "--seed", "--guidance", "--threads"]),
              st.text(st.characters(exclude_categories=("Cs",)), max_size=8).filter(lambda t: not _is_number(t))),
    st.tuples(st.just("--scheduler"), st.text(max_size=8).filter(lambda t: t not in ("ddpm", "ddim"))),
    st.tuples(st.just("--backend"), st.text(max_size=8).filter(
        lambda t: t not in ("auto", "onnxruntime", "tensorrt", "tensorrt-rtx"))),
    st.tuples(st.just("--provider"), st.text(max_size=8).filter(lambda t: t not in ("cpu",))),
)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _one_error_line(err: str) -> None:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "usage:" not in err, err


def test_generate_arguments_out_of_range_give_one_error_line(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "x.png"

    @FUZZ
    @given(BAD_GENERATE_ARGS)
    def case(arg):
        flag, value = arg
        argv = ["--bundle", str(tiny_bundle), "--prompt", "a cat", "--height", "64", "--width", "64",
                "--steps", "1", "--out", str(out), f"{flag}={value}"]
        rc = _run(generate_main, argv)
        captured = capsys.readouterr()
        assert rc == EXIT_USAGE, (argv, captured.err)
        _one_error_line(captured.err)
        assert not out.exists()

    case()


def _not(valid):
    return lambda t: t.strip().lower() not in valid


BAD_EXPORT_ARGS = st.one_of(
    st.tuples(st.just("--max-batch"), st.integers(-1000, 0).map(str)),
    st.tuples(st.just("--opt-level"), st.one_of(st.integers(-100, -1), st.integers(6, 100)).map(str)),
    st.tuples(st.just("--workspace-mib"), st.integers(-100, 63).map(str)),
    st.tuples(st.just("--seed"), st.integers(-10**9, -1).map(str)),
    st.tuples(st.just("--opset"), st.one_of(st.integers(-5, MIN_OPSET - 1), st.integers(MAX_OPSET + 1, 99)).map(str)),
    st.tuples(st.just("--static"), st.one_of(
        st.text(max_size=10).filter(lambda t: not re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", t)),
        st.tuples(_bad_size(), st.integers(64, 2048)).map(lambda hw: f"{hw[0]}x{hw[1]}"))),
    st.tuples(st.just("--calibration-count"), st.integers(-100, 0).map(str)),
    st.tuples(st.just("--compute-capability"), st.text(max_size=6).filter(_not({c.lower() for c in RTX_CCS}))),
    st.tuples(st.just("--target"), st.text(max_size=10).filter(_not(set(TARGETS)))),
    st.tuples(st.just("--preset"), st.text(max_size=10).filter(_not(set(ALL_PRESETS)))),
    st.tuples(st.just("--exporter"), st.text(max_size=10).filter(_not(set(EXPORTERS)))),
)
# flags checked only for the targets that use them
_TARGET_OF = {"--max-batch": "trt-rtx-fp16", "--opt-level": "trt-rtx-fp16", "--workspace-mib": "trt-rtx-fp16",
              "--static": "trt-rtx-fp16", "--compute-capability": "trt-rtx-fp16", "--calibration-count": "onnx-int8"}


def test_export_arguments_out_of_range_give_one_error_line(tmp_path, capsys):
    out = tmp_path / "bundle"

    @FUZZ
    @given(BAD_EXPORT_ARGS)
    def case(arg):
        flag, value = arg
        target = ["--target", _TARGET_OF[flag]] if flag in _TARGET_OF else []
        argv = [*target, "--out", str(out), f"{flag}={value}"]
        rc = _run(export_main, argv)
        captured = capsys.readouterr()
        assert rc == EXIT_USAGE, (argv, captured.err)
        _one_error_line(captured.err)
        assert list(tmp_path.iterdir()) == []  # no bundle, no partial directory

    case()
