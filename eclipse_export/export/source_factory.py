"""A model source by preset or by a bundle's recorded source, for every family: Kandinsky 2.2
(export/sources.py) and Karlo (export/karlo.py). The one place that knows both."""

from __future__ import annotations

from eclipse_export.export import karlo, sources
from eclipse_export.export.sources import StackSource


def make_source(preset: str, seed: int = 0, locations: dict[str, str] | None = None,
                allow_pickle: bool = False) -> StackSource:
    if preset in karlo.presets.ALL_PRESETS:
        return karlo.make_karlo_source(preset, seed, locations, allow_pickle)
    return sources.make_source(preset, seed, locations, allow_pickle)


def source_from_manifest(described: dict) -> StackSource:
    """Rebuild the source a bundle was exported from (for the PyTorch reference)."""
    if described.get("family") == "karlo":
        return karlo.karlo_source_from_manifest(described)
    return sources.source_from_manifest(described)
