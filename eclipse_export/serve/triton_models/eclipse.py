"""The `eclipse` model: prompt (+ optional negative prompt, seed, steps, guidance, size) in, an
(H, W, 3) uint8 image out per row. It loads its bundle once per instance. In the `single` layout
it runs the graphs itself with the backend the bundle calls for; in the `stages` layout it is the
BLS model: the same pipeline code drives the four graph models through Triton requests, so
Triton's dynamic batcher can merge UNet steps of concurrent requests.

Triton gives `execute` every request its dynamic batcher collected; each is validated on its
own (a bad one gets an error response, the others run), and rows that agree on everything but
prompt and seed run as one batched pipeline call (serve/generator.py)."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from eclipse_export.serve.generator import Generator
from eclipse_export.serve.limits import Item, RequestError, ServeLimits, validate_item
from eclipse_export.serve.triton_models.common import (
    bundle_path,
    device_of,
    error_response,
    model_config,
    serve_config,
)

INPUTS = ("PROMPT", "NEGATIVE_PROMPT", "SEED", "STEPS", "GUIDANCE", "HEIGHT", "WIDTH")


def _column(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def parse_request(request, limits: ServeLimits) -> list[Item]:
    columns = {name: _column(request, name) for name in INPUTS}
    prompts = columns["PROMPT"]
    if prompts is None or len(prompts) == 0:
        raise RequestError("PROMPT is required")
    rows = len(prompts)
    for name, col in columns.items():
        if col is not None and len(col) != rows:
            raise RequestError(f"{name} has {len(col)} values for {rows} prompts (one value per row)")
    items = []
    for r in range(rows):
        value = {name: (None if col is None else col[r]) for name, col in columns.items()}
        items.append(validate_item(limits, value["PROMPT"], value["NEGATIVE_PROMPT"], value["SEED"],
                                   value["STEPS"], value["GUIDANCE"], value["HEIGHT"], value["WIDTH"]))
    if len({(it.height, it.width) for it in items}) > 1:
        raise RequestError("all rows of one request must ask for the same HEIGHT and WIDTH (one IMAGE tensor)")
    return items


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        serve = serve_config(args)
        device, device_id = device_of(args)
        backend = None
        if serve.get("layout") == "stages":
            from eclipse_export.serve.triton_models.remote import RemoteBackend

            backend = RemoteBackend(serve["stage_models"], serve.get("stage_batching", True))
        self.generator = Generator(bundle_path(args, config), ServeLimits.from_json(serve["limits"]), device,
                                   device_id, serve.get("threads"), backend=backend)
        if serve.get("warmup"):  # sessions, arenas, execution contexts set up before the first user waits
            limits = self.generator.limits
            for result in self.generator.generate([validate_item(limits, "warm-up", steps=1)]):
                if isinstance(result, Exception):
                    raise result
        pb_utils.Logger.log_info(f"eclipse: bundle loaded on {device}:{device_id}, limits {self.generator.limits}")

    def execute(self, requests):
        parsed: list[list[Item] | Exception] = []
        for request in requests:
            try:
                parsed.append(parse_request(request, self.generator.limits))
            except RequestError as e:
                parsed.append(e)
        owners = [(n, item) for n, p in enumerate(parsed) if not isinstance(p, Exception) for item in p]
        results = self.generator.generate([item for _, item in owners]) if owners else []
        images: dict[int, list] = {}
        for (n, _), result in zip(owners, results):
            images.setdefault(n, []).append(result)
        responses = []
        for n, p in enumerate(parsed):
            failed = p if isinstance(p, Exception) else next((r for r in images[n] if isinstance(r, Exception)), None)
            if failed is not None:
                responses.append(error_response(failed))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGE", np.stack(images[n]))]))
        return responses

    def finalize(self):
        self.generator.close()
