"""One graph of a bundle as its own model (the stages layout): inputs and outputs are the
graph's, batched along the first axis. Triton hands `execute` the requests its dynamic batcher
collected; requests whose non-batch shapes (and, for the UNet, timestep) agree run as one call
of the graph. How many requests each execution merged is what Triton's metrics count
(nv_inference_request_success vs nv_inference_exec_count)."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from eclipse_export.families.kandinsky22.components import COMPONENTS
from eclipse_export.runtime.bundle import open_bundle
from eclipse_export.serve.generator import backend_for
from eclipse_export.serve.triton_models.common import (
    bundle_path,
    device_of,
    error_response,
    model_config,
    serve_config,
)
from eclipse_export.serve.triton_models.remote import PER_CALL


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        serve = serve_config(args)
        bundle = open_bundle(bundle_path(args, config))
        device, device_id = device_of(args)
        self.spec = COMPONENTS[serve["component"]]
        self.backend = backend_for(bundle.manifest, device, device_id, serve.get("threads"))
        self.session = self.backend.load(self.spec, bundle)

    def execute(self, requests):
        feeds = []
        for request in requests:
            feeds.append({t.name: pb_utils.get_input_tensor_by_name(request, t.name).as_numpy()
                          for t in self.spec.inputs})
        groups: dict[tuple, list[int]] = {}
        for n, feed in enumerate(feeds):
            key = tuple((k, v.shape[1:]) for k, v in feed.items() if k != PER_CALL)
            if PER_CALL in feed:
                per_call = np.unique(feed[PER_CALL])
                key += (float(per_call[0]) if len(per_call) == 1 else n,)  # mixed values: alone
            groups.setdefault(key, []).append(n)
        responses: list = [None] * len(requests)
        for members in groups.values():
            try:
                outputs = self._run([feeds[n] for n in members])
            except Exception as e:  # noqa: BLE001 - this group's requests fail, the model keeps serving
                for n in members:
                    responses[n] = error_response(e)
                continue
            start = 0
            for n in members:
                rows = len(next(v for k, v in feeds[n].items() if k != PER_CALL))
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value[start:start + rows]))
                           for name, value in outputs.items()]
                responses[n] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += rows
        return responses

    def _run(self, feeds: list[dict]) -> dict:
        merged = {}
        for t in self.spec.inputs:
            if t.name == PER_CALL:
                merged[t.name] = feeds[0][t.name].reshape(-1)[:1]
            else:
                merged[t.name] = np.concatenate([f[t.name] for f in feeds])
        return self.session.run(merged)

    def finalize(self):
        close = getattr(self.backend, "close", None)
        if close:
            close()
