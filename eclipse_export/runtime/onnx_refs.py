"""The external-data references of an ONNX graph file, read from its protobuf wire format.

A graph names the files that hold its weights itself (TensorProto.external_data: `location`,
`offset`, `length`), and ONNX Runtime before 1.24 follows a location anywhere (`../x`, `/abs/x`;
measured: 1.20.1, 1.22.1, 1.23.2 read the file, 1.24.1+ refuse). The runtime therefore reads
every reference before a backend sees the graph (bundle.py checks them against the manifest).

The edge runtime does not import `onnx` (import-linter), so this is a reader of just the fields
on the path to a TensorProto (ModelProto.graph/.functions/.training_info -> GraphProto.initializer,
.sparse_initializer, .node -> NodeProto.attribute -> AttributeProto.t/.tensors/.g/.graphs/
.sparse_tensor(s) -> TensorProto.name/.external_data/.data_location), tested against the `onnx`
package on every graph the tests export (tests/test_onnx_refs.py). The C++ runtime's twin is
cpp/src/core/onnx_refs.cpp.

It walks a read-only memory map: length-delimited fields that lead nowhere (raw_data: the weights
of graphs without external data, up to GBs) are skipped by moving an index, never copied, so
only the pages of the graph's structure are read. Everything is bounded: a varint of more than
10 bytes, a length past its enclosing message, a group or invalid wire type, or nesting deeper
than protobuf's own default limit (100) is an `OnnxRefsError`, never a crash.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

# protobuf's default recursion limit: deeper files are refused by ONNX Runtime's parser too
MAX_DEPTH = 100
# ONNX Runtime reads a tensor whose location is this tag from the process memory at `offset`
# (in-memory initializers, onnxruntime/core/framework/tensorprotoutils.h); never from a bundle
ORT_MEMORY_TAG = "*/_ORT_MEM_ADDR_/*"
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# field numbers (onnx/onnx.proto3)
_MODEL_GRAPH, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_INIT, _TRAINING_ALGO = 1, 2
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTRIBUTE = 5  # NodeProto and FunctionProto (whose nodes are field 7)
_FUNCTION_NODE = 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


class OnnxRefsError(ValueError):
    """The file is not a well-formed protobuf, or a reference is malformed."""


@dataclass(frozen=True)
class ExternalRef:
    """One tensor's external data: `length` None means to the end of the file."""
    tensor: str
    location: str
    offset: int
    length: int | None


def external_data_refs(path: str | Path) -> list[ExternalRef]:
    """Every external-data reference of the graph file `path`, in file order."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            refs: list[ExternalRef] = []
            _Reader(view, refs).model(0, size)
            return refs


def _parse_count(key: str, value: str, tensor: str) -> int:
    # decimal digits only: ONNX Runtime and onnx parse these strings differently ("+1", " 1", "1e3")
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise OnnxRefsError(f"tensor {tensor!r}: external data {key} {value!r} is not a non-negative integer")
    return int(value)


class _Reader:
    def __init__(self, view: mmap.mmap, refs: list[ExternalRef]):
        self.view, self.refs = view, refs

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        value = shift = 0
        for _ in range(10):
            if pos >= end:
                raise OnnxRefsError(f"truncated varint at byte {pos}")
            b = self.view[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value & 0xFFFFFFFFFFFFFFFF, pos
            shift += 7
        raise OnnxRefsError(f"varint longer than 10 bytes at byte {pos}")

    def fields(self, pos: int, end: int):
        """(field number, wire type, value or (start, stop) of a length-delimited field)."""
        view, varint = self.view, self.varint
        while pos < end:
            key = view[pos]  # one-byte varints inline: most keys and lengths of a graph's structure
            key, pos = (key, pos + 1) if key < 0x80 else varint(pos, end)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise OnnxRefsError(f"field number 0 at byte {pos}")
            if wire == 0:
                value, pos = varint(pos, end)
                yield number, wire, value
            elif wire == 1 or wire == 5:
                pos += 8 if wire == 1 else 4
                if pos > end:
                    raise OnnxRefsError(f"fixed-size field past the end of its message at byte {pos}")
            elif wire == 2:
                if pos < end and view[pos] < 0x80:
                    length, pos = view[pos], pos + 1
                else:
                    length, pos = varint(pos, end)
                if length > end - pos:
                    raise OnnxRefsError(f"field of {length} bytes past the end of its message at byte {pos}")
                yield number, wire, (pos, pos + length)
                pos += length
            else:  # groups (3, 4) are not in ONNX's schema; 6, 7 are not wire types
                raise OnnxRefsError(f"wire type {wire} at byte {pos}")

    def messages(self, pos: int, end: int, wanted: dict[int, str], depth: int):
        if depth > MAX_DEPTH:
            raise OnnxRefsError(f"messages nested deeper than {MAX_DEPTH}")
        for number, wire, value in self.fields(pos, end):
            if wire == 2 and number in wanted:
                yield wanted[number], value

    def model(self, pos: int, end: int) -> None:
        kinds = {_MODEL_GRAPH: "graph", _MODEL_TRAINING_INFO: "training", _MODEL_FUNCTIONS: "function"}
        for kind, (a, b) in self.messages(pos, end, kinds, 1):
            if kind == "graph":
                self.graph(a, b, 2)
            elif kind == "function":
                self.nodes(a, b, _FUNCTION_NODE, 2)
            else:
                for _, (c, d) in self.messages(a, b, {_TRAINING_INIT: "g", _TRAINING_ALGO: "g"}, 2):
                    self.graph(c, d, 3)

    def graph(self, pos: int, end: int, depth: int) -> None:
        kinds = {_GRAPH_NODE: "node", _GRAPH_INITIALIZER: "tensor", _GRAPH_SPARSE: "sparse"}
        for kind, (a, b) in self.messages(pos, end, kinds, depth):
            self.dispatch(kind, a, b, depth + 1)

    def nodes(self, pos: int, end: int, node_field: int, depth: int) -> None:
        for _, (a, b) in self.messages(pos, end, {node_field: "node"}, depth):
            self.dispatch("node", a, b, depth + 1)

    def dispatch(self, kind: str, pos: int, end: int, depth: int) -> None:
        if kind == "tensor":
            self.tensor(pos, end)
        elif kind == "graph":
            self.graph(pos, end, depth)
        elif kind == "sparse":
            for _, (a, b) in self.messages(pos, end, {_SPARSE_VALUES: "t", _SPARSE_INDICES: "t"}, depth):
                self.tensor(a, b)
        elif kind == "node":
            for _, (a, b) in self.messages(pos, end, {_NODE_ATTRIBUTE: "a"}, depth):
                kinds = {_ATTR_T: "tensor", _ATTR_TENSORS: "tensor", _ATTR_G: "graph", _ATTR_GRAPHS: "graph",
                         _ATTR_SPARSE: "sparse", _ATTR_SPARSES: "sparse"}
                for sub, (c, d) in self.messages(a, b, kinds, depth + 1):
                    self.dispatch(sub, c, d, depth + 2)

    def text(self, a: int, b: int, strict: bool = False) -> str:
        try:
            return self.view[a:b].decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            # a replaced character could match a listed name while the loader opens the raw bytes
            raise OnnxRefsError(f"external data entry at byte {a} is not UTF-8") from None

    def tensor(self, pos: int, end: int) -> None:
        name, external, entries = "", False, []
        for number, wire, value in self.fields(pos, end):
            if number == _TENSOR_NAME and wire == 2:
                name = self.text(*value)
            elif number == _TENSOR_LOCATION and wire == 0:
                # a closed enum read as int32 (protobuf keeps the low 32 bits)
                external = (value & 0xFFFFFFFF) == _EXTERNAL
            elif number == _TENSOR_EXTERNAL and wire == 2:
                key = val = ""
                for n, w, v in self.fields(*value):
                    if w == 2 and n == _ENTRY_KEY:
                        key = self.text(*v, strict=True)
                    elif w == 2 and n == _ENTRY_VALUE:
                        val = self.text(*v, strict=True)
                entries.append((key, val))
        if not external and not entries:
            return
        # Any location entry counts, even without data_location EXTERNAL: stricter than the
        # loaders (which ignore it then), so no reading of the fields can hide a reference.
        seen: dict[str, str] = {}
        for key, val in entries:
            if key in ("location", "offset", "length"):
                if key in seen:
                    raise OnnxRefsError(f"tensor {name!r}: external data names its {key} twice")
                seen[key] = val
        if "location" not in seen:
            raise OnnxRefsError(f"tensor {name!r}: external data without a location")
        offset = _parse_count("offset", seen["offset"], name) if "offset" in seen else 0
        length = _parse_count("length", seen["length"], name) if "length" in seen else None
        self.refs.append(ExternalRef(name, seen["location"], offset, length))
