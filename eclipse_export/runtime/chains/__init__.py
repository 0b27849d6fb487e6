"""One driver per model family: the host-side glue between the family's graphs (families/<name>:
specs + chain). A driver gets the pipeline's loaded sessions and runs one request through its
chain; `Pipeline` picks the driver from the bundle's family. Drivers never know which backend
runs a graph."""

from __future__ import annotations

from eclipse_export.runtime.chains.kandinsky22 import Kandinsky22Chain
from eclipse_export.runtime.chains.karlo import KarloChain
from eclipse_export.runtime.chains.lambda_eclipse import LambdaEclipseChain

# family name (manifest "family") -> driver class
DRIVERS = {"kandinsky22": Kandinsky22Chain, "lambda": LambdaEclipseChain, "karlo": KarloChain}


def driver_for(family_name: str):
    try:
        return DRIVERS[family_name]
    except KeyError:
        # families/ and this table are kept equal by tests/test_families.py
        raise KeyError(f"no runtime driver for model family {family_name!r}") from None
