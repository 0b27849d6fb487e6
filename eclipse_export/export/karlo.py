"""Where the Karlo (unCLIP) components come from: the random presets (tiny-karlo,
full-random-karlo) or the real checkpoints (ECLIPSE_Karlo_Prior + kakaobrain/karlo-v1-alpha in
diffusers' UnCLIPPipeline layout). Same interface as export/sources.py's Kandinsky sources; the
bundle carries the decoder's and the super-resolution's scheduler configs instead of
Kandinsky's one scheduler and zero-image embedding."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

from eclipse_export.export.prior import EclipsePrior
from eclipse_export.export.sources import (
    PretrainedSource,
    SourceError,
    StackSource,
    _finish,
    randomize_parameters,
)
from eclipse_export.families.karlo import FAMILY as KARLO
from eclipse_export.families.karlo import presets
from eclipse_export.families.karlo.components import stack_dims

SCHEDULER_FILES = {"decoder_scheduler": "decoder_scheduler_config.json",
                   "super_res_scheduler": "super_res_scheduler_config.json"}


def _text_proj_class():
    # diffusers moved the unCLIP pipeline (and its text projection) under pipelines/deprecated
    try:
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    except ImportError:  # older diffusers
        from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
    return UnCLIPTextProjModel


def _classes() -> dict:
    from diffusers import UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextModelWithProjection

    return {"text_encoder": CLIPTextModelWithProjection, "prior": EclipsePrior, "text_proj": _text_proj_class(),
            "decoder": UNet2DConditionModel, "super_res_first": UNet2DModel, "super_res_last": UNet2DModel}


def build(component: str, config: dict) -> torch.nn.Module:
    from transformers import CLIPTextConfig

    cls = _classes().get(component)
    if cls is None:
        raise SourceError(f"unknown Karlo component {component!r}")
    if component == "text_encoder":
        return cls(CLIPTextConfig(**config))
    return cls(**config)


class KarloSourceMixin:
    family = KARLO

    def dims(self) -> dict[str, int]:
        return stack_dims(self.configs)

    def scheduler_configs(self) -> dict[str, dict]:
        return {name: dict(self.configs[name]) for name in SCHEDULER_FILES}

    def write_bundle_files(self, work: Path) -> list[str]:
        """The files the Karlo driver opens besides its graphs and tokenizer (the family's
        required_files): both scheduler configs, checked against the runtime's scheduler."""
        from eclipse_export.runtime.unclip_scheduler import UnCLIPScheduler

        written = []
        for name, rel in SCHEDULER_FILES.items():
            config = self.configs[name]
            try:
                UnCLIPScheduler(config)
            except ValueError as e:
                raise SourceError(f"{name}: unsupported scheduler config: {e}") from None
            (work / rel).write_text(json.dumps(config, indent=2, sort_keys=True))
            written.append(rel)
        return written

    def negative_image_embeds(self) -> np.ndarray:  # Karlo's unconditional rows use text_proj's learned one
        raise SourceError("Karlo bundles have no zero-image embedding (text_proj learns the unconditional one)")


class RandomKarloSource(KarloSourceMixin, StackSource):
    """A Karlo preset architecture with deterministic random weights."""

    def __init__(self, preset: str, seed: int = 0):
        if preset not in presets.RANDOM_PRESETS:
            raise SourceError(f"unknown random preset {preset!r} (choose from {', '.join(presets.RANDOM_PRESETS)})")
        self.name, self.seed = preset, seed
        self.configs = presets.preset_configs(preset)

    def load(self, component: str) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        module = build(component, self.configs[component])
        randomize_parameters(module, self.seed + zlib.crc32(component.encode()))
        return _finish(module)

    def write_tokenizer(self, out_dir: Path) -> dict:
        from eclipse_export.export.tokenizer_files import write_tokenizer_files

        return write_tokenizer_files(out_dir, None)

    def describe(self) -> dict:
        return {"kind": "random", "family": "karlo", "preset": self.name, "seed": self.seed, "configs": self.configs}


class PretrainedKarloSource(KarloSourceMixin, PretrainedSource):
    """ECLIPSE_Karlo_Prior + kakaobrain/karlo-v1-alpha (hub ids or local directories laid out
    like the hub repositories; safetensors unless allow_pickle)."""

    hub_sources = presets.HUB_SOURCES
    config_components = ("text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last",
                         "decoder_scheduler", "super_res_scheduler")
    preset = "karlo"

    def load(self, component: str) -> torch.nn.Module:
        self._check_weights(component)
        folder = self._dir(component)
        cls = _classes().get(component)
        if cls is None:
            raise SourceError(f"unknown Karlo component {component!r}")
        module = cls.from_pretrained(folder, use_safetensors=(not self.allow_pickle) or None)
        return _finish(module.float())

    def describe(self) -> dict:
        return {**super().describe(), "family": "karlo"}


def make_karlo_source(preset: str, seed: int = 0, locations: dict[str, str] | None = None,
                      allow_pickle: bool = False) -> StackSource:
    if preset in presets.RANDOM_PRESETS:
        return RandomKarloSource(preset, seed)
    return PretrainedKarloSource(locations, allow_pickle=allow_pickle)


def karlo_source_from_manifest(described: dict) -> StackSource:
    if described.get("kind") == "random":
        return RandomKarloSource(described["preset"], int(described["seed"]))
    if described.get("kind") == "pretrained":
        locations = {c: e["path"] if Path(e["path"]).is_dir() else e["location"]
                     for c, e in described["components"].items()}
        return PretrainedKarloSource(locations, allow_pickle=bool(described.get("allow_pickle")))
    raise SourceError(f"the bundle's manifest names an unknown source kind {described.get('kind')!r}")
