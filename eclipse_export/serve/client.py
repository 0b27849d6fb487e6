"""A tritonclient example: ask a served `eclipse` model for images and write PNGs.

    python -m eclipse_export.serve.client --url 127.0.0.1:8000 --prompt "a red cube" --seed 0 --out cube.png
    python -m eclipse_export.serve.client --url 127.0.0.1:8001 --protocol grpc ...

`generate` is the function the tests and the load run use; `model_metrics` reads Triton's
Prometheus counters (how many requests each model served in how many executions).
"""

from __future__ import annotations

import argparse
import re
import sys
import urllib.request
from pathlib import Path

import numpy as np

MODEL = "eclipse"
PROTOCOLS = ("http", "grpc")


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}")
    return module


def connect(url: str, protocol: str = "http"):
    return _module(protocol).InferenceServerClient(url)


def make_inputs(protocol: str, prompt: str, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                height: int | None = None, width: int | None = None, negative_prompt: str | None = None) -> list:
    """One row; None leaves an optional input out (the model's default)."""
    module = _module(protocol)
    values = [("PROMPT", np.array([[prompt.encode("utf-8")]], dtype=object), "BYTES"),
              ("SEED", np.array([[seed]], dtype=np.uint64), "UINT64")]
    if negative_prompt is not None:
        values.append(("NEGATIVE_PROMPT", np.array([[negative_prompt.encode("utf-8")]], dtype=object), "BYTES"))
    for name, value, dtype, np_type in (("STEPS", steps, "INT32", np.int32), ("GUIDANCE", guidance, "FP32", np.float32),
                                        ("HEIGHT", height, "INT32", np.int32), ("WIDTH", width, "INT32", np.int32)):
        if value is not None:
            values.append((name, np.array([[value]], dtype=np_type), dtype))
    inputs = []
    for name, array, dtype in values:
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def generate(client, protocol: str, prompt: str, **fields) -> np.ndarray:
    """One (H, W, 3) uint8 image. Raises tritonclient's InferenceServerException with the
    model's message for a refused request."""
    module = _module(protocol)
    result = client.infer(MODEL, make_inputs(protocol, prompt, **fields),
                          outputs=[module.InferRequestedOutput("IMAGE")])
    return result.as_numpy("IMAGE")[0]


_SAMPLE = re.compile(r'^(nv_inference_\w+)\{model="([^"]+)",version="[^"]*"\} ([0-9.eE+-]+)$')


def model_metrics(metrics_url: str) -> dict[str, dict[str, float]]:
    """model -> {metric name: value} from Triton's /metrics: nv_inference_request_success
    (requests), nv_inference_count (batch rows), nv_inference_exec_count (executions): fewer
    executions than requests means the dynamic batcher merged requests."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eclipse_export.serve.client", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="127.0.0.1:8000", help="server address (HTTP 8000, gRPC 8001 by default)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="http")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--out", type=Path, default=Path("out.png"))
    args = p.parse_args(argv)
    from tritonclient.utils import InferenceServerException

    from eclipse_export.runtime.images import save_png

    client = connect(args.url, args.protocol)
    try:
        image = generate(client, args.protocol, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                         height=args.height, width=args.width, negative_prompt=args.negative_prompt)
    except InferenceServerException as e:
        print(f"error: {e.message()}", file=sys.stderr)
        return 2
    finally:
        client.close()  # an open connection would hold the server's shutdown until its exit timeout
    save_png(image, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
