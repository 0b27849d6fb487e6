"""What an export is asked to make: targets and their precisions, exporter and opset choices, the
options dataclasses and the error users see. No torch, no onnx: the CLI and --from-bundle import it
on devices."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eclipse_export.export.engines import BuildOptions

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 17
# 14: torch's exporter has no scaled_dot_product_attention before it (measured: 12 and 13 fail,
# 14..22 export the tiny stack); 21: the newest opset of ONNX 1.16, which ONNX Runtime 1.20 (the
# runtime's oldest supported version, pyproject) implements
MIN_OPSET, MAX_OPSET = 14, 21
# protobuf cannot serialise a model over 2 GiB; stay well under it before switching to external data
EXTERNAL_DATA_BYTES = 1 << 30
# target -> precision of its graphs
TARGETS = {"onnx": "fp32", "onnx-fp16": "fp16", "trt-fp16": "fp16", "trt-rtx-fp16": "fp16",
           "onnx-int8": "int8", "trt-int8": "int8"}
# int8 targets -> whose kernels their Q/DQ graphs are shaped for (quantize.RULES): the ONNX
# Runtime target gets what ORT's x86 integer kernels fuse, the TensorRT target TensorRT's rules
INT8_RULES = {"onnx-int8": "ort-cpu", "trt-int8": "tensorrt"}
# engine targets -> TensorRT flavour (their bundles hold the ONNX too: refit, re-builds).
# INT8 convolutions are a TensorRT feature (TensorRT-RTX has weight-only INT8 GEMM only).
ENGINE_TARGETS = {"trt-fp16": "tensorrt", "trt-rtx-fp16": "tensorrt-rtx", "trt-int8": "tensorrt"}


class ExportError(RuntimeError):
    """Export failed for a reason the user can act on."""


# What building from a shipped bundle adds to the edge runtime (pyproject's `edge-build` extra):
# onnx reads the graphs (ops TensorRT cannot parse, Q/DQ rewriting); torch is never needed there.
EDGE_BUILD_EXTRA = "pip install 'eclipse-export[edge-build]' (the onnx package; no torch)"


def require_onnx(what: str) -> None:
    """One actionable line, before any work, where the onnx package is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError(f"{what} needs the onnx package: {EDGE_BUILD_EXTRA}") from None


@dataclass(frozen=True)
class ExportOptions:
    target: str = "onnx"
    exporter: str = "torchscript"
    opset: int = DEFAULT_OPSET
    overwrite: bool = False
    check_parity: bool = True
    build: "BuildOptions | None" = None  # engine options for trt-* targets (flavour set from the target)
    engine_cache: Path | None = None
    int8: "Int8Options | None" = None  # *-int8 targets (default Int8Options())


@dataclass(frozen=True)
class Int8Options:
    # empty: the family's choice (Family.calibration.components: Kandinsky's UNet, Karlo's three UNets)
    components: tuple[str, ...] = ()
    prompts: Path | None = None  # None: the project's calibration/prompts.jsonl
    calibration_prompts: int = 64  # first N of the calibration split
    validation_prompts: int = 8  # first N of the validation split: the export-time INT8 parity check
    capture: "object | None" = None  # calibrate.CaptureOptions (None: defaults)
    method: str = "minmax"
    # captured inputs persist here (resumable); None: inside the partial bundle, removed afterwards
    cache_dir: Path | None = None
    # quantize.RULES; None: the target's (INT8_RULES). onnx-int8 with "tensorrt" rebuilds the
    # TensorRT-shaped graph on ONNX Runtime (the before side of issue 13's comparison)
    rules: str | None = None


Log = Callable[[str], None]
