"""A backend whose sessions are other models of the same Triton server (BLS requests): the
stages layout's pipeline model runs the unchanged Pipeline code with it, so its images are the
single-model layout's. The UNet's `timestep` (one value per call) travels as one value per row,
so that the stage model can batch rows of different requests and split them by timestep."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import triton_python_backend_utils as pb_utils

from eclipse_export.families.spec import ComponentSpec
from eclipse_export.runtime.backends.base import BackendError, checked_inputs
from eclipse_export.runtime.bundle import Bundle

PER_CALL = "timestep"  # inputs with one value per call, sent as one value per batch row


class RemoteSession:
    def __init__(self, spec: ComponentSpec, model: str, batching: bool = True):
        self.spec = spec
        self.model = model
        self.batching = batching  # False: Triton's own backends run the graph's shapes as they are

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = checked_inputs(self.spec, inputs)
        rows = next(len(v) for k, v in feed.items() if k != PER_CALL)
        tensors = []
        for name, value in feed.items():
            if name == PER_CALL and self.batching:
                value = np.repeat(value.reshape(1, -1), rows, axis=0)
            tensors.append(pb_utils.Tensor(name, value))
        request = pb_utils.InferenceRequest(model_name=self.model, inputs=tensors,
                                            requested_output_names=self.spec.output_names)
        response = request.exec()
        if response.has_error():
            raise BackendError(f"model {self.model}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.spec.output_names}


class RemoteBackend:
    name = "triton-bls"

    def __init__(self, models: Mapping[str, str], batching: bool = True):
        self.models = dict(models)  # component -> model name in the repository
        self.batching = batching

    def load(self, spec: ComponentSpec, bundle: Bundle) -> RemoteSession:
        return RemoteSession(spec, self.models[spec.name], self.batching)

    def describe(self) -> dict:
        return {"backend": self.name, "models": self.models}
