"""What differs per model family, as data: the components (their specs), the chain that connects
them, the files and dims a bundle of the family carries, and the presets that export it.

A bundle's manifest names its family; the runtimes (Python: runtime/chains/, C++:
cpp/src/core/pipeline.cpp) pick the family's driver from it and refuse a family they do not know.
Nothing here imports torch or onnx: the edge runtime reads it.

Adding a family: a folder here with its component specs and chain (a `Family`), registered in
FAMILIES; a driver in runtime/chains/ registered under the same name; its export side (sources,
torch modules, graph wrappers) in export/. No other module branches on a family's name.
"""

from __future__ import annotations

from eclipse_export.families.chain import Family, Stage  # noqa: F401 (the package's vocabulary)
from eclipse_export.families.kandinsky22 import FAMILY as KANDINSKY22
from eclipse_export.families.karlo import FAMILY as KARLO
from eclipse_export.families.lambda_eclipse import FAMILY as LAMBDA

FAMILIES: dict[str, Family] = {f.name: f for f in (KANDINSKY22, LAMBDA, KARLO)}
# bundles of format 1 (before families) are all Kandinsky 2.2 + ECLIPSE
DEFAULT_FAMILY = "kandinsky22"


class UnknownFamily(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UnknownFamily(f"model family {name!r} is not known to this version of eclipse-export "
                            f"(it knows {', '.join(FAMILIES)})") from None


def family_of_preset(preset: str) -> Family:
    for family in FAMILIES.values():
        if preset in family.presets:
            return family
    raise UnknownFamily(f"unknown preset {preset!r} (choose from {', '.join(all_presets())})")


def all_presets() -> tuple[str, ...]:
    return tuple(p for f in FAMILIES.values() for p in f.presets)
