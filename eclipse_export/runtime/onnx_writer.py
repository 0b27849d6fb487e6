"""Just enough of the ONNX protobuf format to write a small graph, without the `onnx` package.

The runtime builds one tiny graph at run time (the guided scheduler step, runtime/step_graph.py)
and the edge install has onnxruntime but not `onnx` (export-time only): rather than add a 17 MB
dependency for ~10 nodes, this writes ModelProto bytes directly. Only what that graph needs:
nodes with int/float attributes, raw-data initializers, typed inputs/outputs with symbolic or
fixed dimensions. Field numbers are onnx.proto's (stable by protobuf's compatibility rules);
fields are written in field-number order and repeated scalars unpacked, as onnx.proto is proto2,
so the bytes equal what `onnx.helper` + SerializeToString give (tests/test_ort_device_loop.py
checks that, and runs onnx.checker on the result).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# TensorProto.DataType
FLOAT, INT32, INT64, FLOAT16 = 1, 6, 7, 10
_ELEM_TYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.int32): INT32, np.dtype(np.int64): INT64,
               np.dtype(np.float16): FLOAT16}
# AttributeProto.AttributeType
_ATTR_FLOAT, _ATTR_INT, _ATTR_INTS = 1, 2, 7
IR_VERSION = 8  # ONNX 1.10+; opset 17 needs IR >= 8


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _key(field, 2) + _varint(len(data)) + data


def _float(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


@dataclass(frozen=True)
class Node:
    op_type: str
    inputs: Sequence[str]
    outputs: Sequence[str]
    name: str = ""
    attributes: tuple[tuple[str, int | float | tuple[int, ...]], ...] = ()

    def encode(self) -> bytes:
        out = b"".join(_bytes(1, i) for i in self.inputs) + b"".join(_bytes(2, o) for o in self.outputs)
        if self.name:
            out += _bytes(3, self.name)
        out += _bytes(4, self.op_type)
        for name, value in self.attributes:
            out += _bytes(5, _attribute(name, value))
        return out


def _attribute(name: str, value) -> bytes:
    if isinstance(value, float):
        return _bytes(1, name) + _float(2, value) + _int(20, _ATTR_FLOAT)
    if isinstance(value, int):
        return _bytes(1, name) + _int(3, value) + _int(20, _ATTR_INT)
    return _bytes(1, name) + b"".join(_int(8, v) for v in value) + _int(20, _ATTR_INTS)


@dataclass(frozen=True)
class Value:
    """A typed graph input or output; shape entries are ints or symbolic names."""

    name: str
    dtype: np.dtype
    shape: Sequence[int | str]

    def encode(self) -> bytes:
        dims = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in self.shape)
        tensor = _int(1, _ELEM_TYPES[np.dtype(self.dtype)]) + _bytes(2, dims)
        return _bytes(1, self.name) + _bytes(2, _bytes(1, tensor))


def _initializer(name: str, array: np.ndarray) -> bytes:
    array = np.asarray(array)  # not ascontiguousarray: it turns a scalar into shape (1,)
    dims = b"".join(_int(1, d) for d in array.shape)
    return dims + _int(2, _ELEM_TYPES[array.dtype]) + _bytes(8, name) + _bytes(9, array.astype(array.dtype.newbyteorder("<")).tobytes(order="C"))


def model_bytes(name: str, nodes: Sequence[Node], inputs: Sequence[Value], outputs: Sequence[Value],
                initializers: dict[str, np.ndarray] | None = None, opset: int = 17,
                producer: str = "eclipse-export") -> bytes:
    """A serialized ModelProto (default domain only)."""
    graph = b"".join(_bytes(1, n.encode()) for n in nodes) + _bytes(2, name)
    graph += b"".join(_bytes(5, _initializer(k, v)) for k, v in (initializers or {}).items())
    graph += b"".join(_bytes(11, v.encode()) for v in inputs) + b"".join(_bytes(12, v.encode()) for v in outputs)
    opset_id = _bytes(1, "") + _int(2, opset)
    return _int(1, IR_VERSION) + _bytes(2, producer) + _bytes(7, graph) + _bytes(8, opset_id)
