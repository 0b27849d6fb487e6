"""Ray Serve app for clusters (`pip install "eclipse-export[ray]"`): HTTP JSON in, PNG out.

    python -m eclipse_export.serve.ray_app --bundle engines/k22-trt-fp16 --gpu --autoscale 1:8
    curl -s localhost:8000/generate -d '{"prompt": "a red cube", "seed": 0}' -o cube.png

One replica per GPU (`num_gpus=1`), or CPU replicas. Batching as measured (docs/decisions.md
"Serving"): `@serve.batch` forms full batches only with `max_ongoing_requests` equal to the
batch size and a batch wait around 0.1 s; with Ray's defaults most requests ran alone. The
request is validated by the same code as the Triton models (serve/limits.py): JSON fields
prompt, negative_prompt, seed, steps, guidance, height, width and nothing else (no field names a
path: the app serves the bundle it was built with). For KubeRay, `app_builder` is the
RayService `import_path` (docs/serving-ray.md).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import signal
import sys
import threading
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from eclipse_export.serve.generator import Generator
from eclipse_export.serve.limits import Item, RequestError, ServeLimits, validate_item

FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "height", "width")
BATCH_WAIT_S = 0.1  # measured: full batches at ~0.1 s; shorter waits sent most requests alone
MAX_BODY_BYTES = 64 * 1024


def png_bytes(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def parse_body(raw: bytes, limits: ServeLimits) -> Item:
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(f"the request body is {len(raw)} bytes; at most {MAX_BODY_BYTES}")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RequestError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)} (accepted: {', '.join(FIELDS)})")
    if "prompt" not in body:
        raise RequestError("prompt is required")
    return validate_item(limits, *(body.get(name) for name in FIELDS))


@serve.deployment
class EclipseDeployment:
    def __init__(self, bundle: str, limits: dict, device: str = "cpu", threads: int | None = None):
        self.generator = Generator(bundle, ServeLimits.from_json(limits), device, 0, threads)
        self.generate_batch.set_max_batch_size(self.generator.limits.max_batch)
        self.generate_batch.set_batch_wait_timeout_s(BATCH_WAIT_S)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=BATCH_WAIT_S)
    async def generate_batch(self, items: list[Item]) -> list:
        # the pipeline blocks: off the event loop, so the replica keeps answering health checks
        results = await asyncio.get_running_loop().run_in_executor(None, self.generator.generate, items)
        return [(result, len(items)) for result in results]

    async def __call__(self, request: Request) -> Response:
        try:
            item = parse_body(await request.body(), self.generator.limits)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        result, batch = await self.generate_batch(item)
        if isinstance(result, RequestError):
            return JSONResponse({"error": str(result)}, status_code=400)
        if isinstance(result, Exception):  # this batch failed; the replica keeps serving
            return JSONResponse({"error": f"generation failed: {type(result).__name__}: {result}"}, status_code=500)
        # how many requests shared the execution: lets a client (and the tests) see batching work
        return Response(png_bytes(result), media_type="image/png", headers={"X-Eclipse-Batch": str(batch)})


def build_app(bundle: str | Path, limits: ServeLimits = ServeLimits(), gpu: bool = False, replicas: int = 1,
              autoscale: tuple[int, int] | None = None, num_cpus: float = 1.0, threads: int | None = None):
    """The bound application: one replica per GPU with gpu=True (num_gpus=1 each)."""
    options = {
        "ray_actor_options": {"num_gpus": 1 if gpu else 0, "num_cpus": num_cpus},
        # == the batch size: more requests in flight per replica only queue; fewer never fill a batch
        "max_ongoing_requests": limits.max_batch,
    }
    if autoscale:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "target_ongoing_requests": limits.max_batch}
    else:
        options["num_replicas"] = replicas
    return EclipseDeployment.options(**options).bind(str(Path(bundle).resolve()), limits.checked().to_json(),
                                                     "gpu" if gpu else "cpu", threads)


def app_builder(args: dict):
    """Ray Serve config `import_path: eclipse_export.serve.ray_app:app_builder`, with `args`:
    bundle (required), gpu, replicas or autoscale [min, max], num_cpus, threads, and the limits
    (max_batch, max_steps, max_size, default_size, default_steps)."""
    args = dict(args)
    bundle = args.pop("bundle")
    limit_names = set(ServeLimits.__dataclass_fields__)
    limits = ServeLimits(**{k: args.pop(k) for k in list(args) if k in limit_names})
    autoscale = tuple(args.pop("autoscale")) if "autoscale" in args else None
    return build_app(bundle, limits, autoscale=autoscale, **args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eclipse_export.serve.ray_app", description="Serve a bundle with Ray Serve.")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--gpu", action="store_true", help="one replica per GPU (num_gpus=1)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--autoscale", metavar="MIN:MAX", help="autoscaling replicas instead of a fixed number")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per replica")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--max-size", type=int, default=1024)
    p.add_argument("--default-size", type=int, default=512)
    p.add_argument("--default-steps", type=int, default=50)
    args = p.parse_args(argv)
    import ray

    autoscale = tuple(int(v) for v in args.autoscale.split(":")) if args.autoscale else None
    limits = ServeLimits(max_batch=args.max_batch, max_steps=args.max_steps, max_size=args.max_size,
                         default_size=args.default_size, default_steps=args.default_steps).checked()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args.bundle, limits, args.gpu, args.replicas, autoscale, args.num_cpus, args.threads),
                  route_prefix="/generate")
        print(f"ready: http://{args.host}:{args.port}/generate (Ctrl-C stops)", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
