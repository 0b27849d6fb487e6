"""The edge runtime: numpy, the `tokenizers` library and a backend (ONNX Runtime). No torch."""

from eclipse_export.runtime.pipeline import Generation, GenerationError, Pipeline  # noqa: F401
