"""What the repository's models share: reading their configuration and turning errors into
Triton error responses (the model keeps serving)."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import triton_python_backend_utils as pb_utils

from eclipse_export.serve.limits import RequestError

SERVE_CONFIG = "serve.json"


def model_config(args: dict) -> dict:
    return json.loads(args["model_config"])


def repository_root(args: dict) -> Path:
    """The Python backend passes the model's own folder as `model_repository`."""
    return Path(args["model_repository"]).parent


def bundle_path(args: dict, config: dict) -> Path:
    """The bundle the repository was created with (a relative path inside the repository,
    fixed at creation; a request can never name another)."""
    rel = config["parameters"]["bundle"]["string_value"]
    parts = PurePosixPath(rel)
    if parts.is_absolute() or ".." in parts.parts or not rel:
        raise ValueError(f"the repository's bundle parameter {rel!r} must be a path inside the repository")
    return repository_root(args) / rel


def serve_config(args: dict) -> dict:
    return json.loads((Path(args["model_repository"]) / SERVE_CONFIG).read_text(encoding="utf-8"))


def device_of(args: dict) -> tuple[str, int]:
    kind = args.get("model_instance_kind", "CPU")
    return ("gpu" if kind == "GPU" else "cpu"), int(args.get("model_instance_device_id", 0) or 0)


def error_response(error: Exception) -> "pb_utils.InferenceResponse":
    if isinstance(error, RequestError):
        message, code = str(error), "INVALID_ARG"
    else:  # the backend failed on valid input: say what, keep serving
        message, code = f"generation failed: {type(error).__name__}: {error}", "INTERNAL"
        pb_utils.Logger.log_error(message)
    try:
        err = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    except (AttributeError, TypeError):  # Python backends before error codes
        err = pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)
