"""The backend interface every backend implements; the pipeline never knows which backend runs
a graph. A backend turns (component spec, bundle) into a `Session` whose `run` maps numpy inputs
by name to numpy outputs by name. The checks every backend applies to a graph's I/O live here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from eclipse_export.families.spec import ComponentSpec, eval_dim
from eclipse_export.runtime.bundle import Bundle, BundleError


class BackendError(RuntimeError):
    """A backend cannot run here (missing package, unavailable provider)."""


class Session(Protocol):
    spec: ComponentSpec

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def load(self, spec: ComponentSpec, bundle: Bundle) -> Session: ...

    def describe(self) -> dict: ...


def io_problems(spec: ComponentSpec, dims: Mapping[str, int], found: Mapping[str, tuple[str, Sequence]]) -> list[str]:
    """How a loaded graph's I/O (name -> (dtype, shape with ints for fixed axes)) departs from
    the spec resolved with the bundle's dims. A bundle whose manifest names the wrong graph, or
    whose dims do not match its graphs, is refused at load instead of failing mid-generation."""
    problems = []
    for t in spec.inputs + spec.outputs:
        if t.name not in found:
            problems.append(f"has no tensor {t.name!r}")
            continue
        dtype, shape = found[t.name]
        if dtype != t.dtype:
            problems.append(f"{t.name} is {dtype}, expected {t.dtype}")
        if len(shape) != len(t.shape):
            problems.append(f"{t.name} has rank {len(shape)}, expected {len(t.shape)}")
            continue
        dynamic = t.dynamic_axes()
        for axis, (got, want) in enumerate(zip(shape, t.shape)):
            if axis in dynamic or not isinstance(got, int) or got < 0:
                continue
            expected = eval_dim(want, dims)
            if got != expected:
                problems.append(f"{t.name} axis {axis} is {got}, the manifest's dims give {expected}")
    extra = set(found) - set(spec.input_names + spec.output_names)
    if extra:
        problems.append(f"has unexpected tensors {sorted(extra)}")
    return problems


def check_io(spec: ComponentSpec, bundle: Bundle, found: Mapping[str, tuple[str, Sequence]]) -> None:
    problems = io_problems(spec, bundle.dims, found)
    if problems:
        raise BundleError(f"{bundle.root}: the {spec.name} graph does not fit the manifest ({'; '.join(problems)}); "
                          f"re-export it (eclipse-export ... --out {bundle.root})")


def checked_inputs(spec: ComponentSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The spec's inputs as contiguous arrays of the spec's dtypes (every backend takes these)."""
    feed = {}
    for t in spec.inputs:
        value = np.asarray(inputs[t.name])
        if value.dtype != np.dtype(t.dtype):
            raise TypeError(f"{spec.name}.{t.name}: expected {t.dtype}, got {value.dtype}")
        feed[t.name] = np.ascontiguousarray(value)
    return feed
