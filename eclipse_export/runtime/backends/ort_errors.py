"""ONNX Runtime's errors as one-line messages (shared by the ORT backend and its device loop)."""

from __future__ import annotations

import re

# error classes of a graph ONNX Runtime cannot take (the bundle's fault, not the machine's)
ORT_GRAPH_ERRORS = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "Fail", "InvalidArgument", "NotImplemented")


def ort_error_line(e: BaseException) -> str:
    """ONNX Runtime's message without its source-file prefixes, on one line. E.g. (real, CUDA EP
    without a GPU): '... cuda_execution_provider_info.cc:63 static ...FromProviderOptions(...)
    [ONNXRuntimeError] : 1 : FAIL : provider_options_utils.h:187 Parse Failed to parse provider
    option "device_id": CUDA failure 100: no CUDA-capable device is detected ; GPU=-1 ; ...'."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = text.rsplit(" FAIL : ", 1)[-1]
    text = re.sub(r"^[\w./]+\.(?:h|cc|cpp):\d+ (?:\w+ )?", "", text)
    text = re.sub(r"^(?:(?:static|void) )*[\w:]+\([^)]*\) ", "", text)  # a C++ signature ahead of the message
    return text.split(" ; GPU=")[0]
