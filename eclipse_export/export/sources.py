"""Where the PyTorch components come from: random-weight presets or the real checkpoints.

A source loads ONE component at a time (`load`), so that export and the reference pipeline
never need the whole ~2 B-parameter stack in memory at once. `describe()` is what the bundle
manifest records, and `source_from_manifest` rebuilds the same source for the reference.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import torch

from eclipse_export.export.prior import EclipsePrior, LambdaEclipsePrior
from eclipse_export.families import family_of_preset
from eclipse_export.families.kandinsky22 import FAMILY as KANDINSKY22
from eclipse_export.families.kandinsky22 import components as k22_components
from eclipse_export.families.kandinsky22 import presets
from eclipse_export.families.lambda_eclipse import IMAGE_PROCESSOR_FILE
from eclipse_export.families.lambda_eclipse import components as lambda_components
from eclipse_export.families.lambda_eclipse import presets as lambda_presets

COMPONENT_NAMES = tuple(KANDINSKY22.components)
# family -> (its presets module, its stack_dims): the export side of families/<name>/
FAMILY_PRESETS = {"kandinsky22": (presets, k22_components.stack_dims),
                  "lambda": (lambda_presets, lambda_components.stack_dims)}
RANDOM_PRESETS = tuple(p for m, _ in FAMILY_PRESETS.values() for p in m.RANDOM_PRESETS)
REAL_PRESETS = tuple(p for m, _ in FAMILY_PRESETS.values() for p in m.REAL_PRESETS)


def prior_class(config: dict) -> type:
    """The λ prior has one token more (the control embedding) than plain ECLIPSE's."""
    return LambdaEclipsePrior if config.get("additional_embeddings") == 4 else EclipsePrior


class SourceError(RuntimeError):
    """A model source cannot be used (bad name, missing files, pickled weights not allowed)."""


# --- random weights ---------------------------------------------------------------------------


def randomize_parameters(module: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights, independent of construction order and of torch's init.

    Every parameter gets its own generator seeded from (seed, name), so the same preset gives
    bit-identical weights at export time and when the reference is rebuilt later. Scales keep
    activations of order one (1/sqrt(fan_in) for matmul/conv weights, ~1 for norm gains) and
    nothing is left at zero, so parity tests exercise every weight.
    """
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    norm_params = {
        f"{mname}.{pname}" if mname else pname
        for mname, m in module.named_modules()
        if isinstance(m, norm_types)
        for pname, _ in m.named_parameters(recurse=False)
    }
    matmul_weights = {
        f"{mname}.weight" if mname else "weight"
        for mname, m in module.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }
    with torch.no_grad():
        for name, p in module.named_parameters():
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name in norm_params:
                r = 1.0 + 0.1 * r if name.endswith("weight") else 0.1 * r
            elif name in matmul_weights:
                r = r / (p[0].numel() ** 0.5)
            else:  # biases, embeddings, positional/prd tokens, codebooks
                r = 0.02 * r
            p.copy_(r.to(p.dtype))


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Fingerprint of a module's weights (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _build(component: str, config: dict) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel, VQModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    if component == "text_encoder":
        return CLIPTextModelWithProjection(CLIPTextConfig(**config))
    if component == "image_encoder":
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    if component == "prior":
        return prior_class(config)(**config)
    if component == "unet":
        return UNet2DConditionModel(**config)
    if component == "movq":
        return VQModel(**config)
    raise SourceError(f"unknown component {component!r}")


def _finish(module: torch.nn.Module) -> torch.nn.Module:
    module.eval().requires_grad_(False)
    # Plain eager attention in transformers: it exports to simple ONNX ops on every exporter.
    if hasattr(module, "set_attn_implementation"):
        try:
            module.set_attn_implementation("eager")
        except Exception:  # older transformers: the config attribute is enough
            module.config._attn_implementation = "eager"
    return module


class StackSource:
    """Interface: configs, dims, per-component loading, scheduler, negative embedding, tokenizer."""

    name: str
    configs: dict
    family = KANDINSKY22  # the sources here export ECLIPSE + Kandinsky 2.2 stacks

    def dims(self) -> dict[str, int]:
        return FAMILY_PRESETS[self.family.name][1](self.configs)

    def image_processor_config(self) -> dict:
        return dict(self.configs["image_processor"])

    def write_extra_files(self, out_dir: Path) -> list[str]:
        """Files the family's driver needs besides tokenizer, scheduler and negative embedding
        (λ: the CLIPImageProcessor config that the runtime's subject preprocessing follows).
        Returns the written paths relative to out_dir."""
        if IMAGE_PROCESSOR_FILE not in self.family.required_files:
            return []
        path = out_dir / IMAGE_PROCESSOR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.image_processor_config(), indent=2, sort_keys=True))
        return [IMAGE_PROCESSOR_FILE]

    def load(self, component: str) -> torch.nn.Module:
        raise NotImplementedError

    def scheduler_config(self) -> dict:
        return dict(self.configs["scheduler"])

    def negative_image_embeds(self) -> np.ndarray:
        """CLIP image embedding of a raw zeros(1,3,224,224) image (the Kandinsky prior's
        'zero embed'), computed once at export and shipped in the bundle so the edge never
        needs the 1.84 B-parameter image encoder."""
        encoder = self.load("image_encoder")
        size = encoder.config.image_size
        with torch.no_grad():
            emb = encoder(torch.zeros(1, 3, size, size)).image_embeds
        return emb.float().numpy().astype(np.float32)

    def write_tokenizer(self, out_dir: Path) -> dict:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class RandomSource(StackSource):
    """A preset architecture with deterministic random weights (never real images)."""

    def __init__(self, preset: str, seed: int = 0):
        if preset not in RANDOM_PRESETS:
            raise SourceError(f"unknown random preset {preset!r} (choose from {', '.join(RANDOM_PRESETS)})")
        self.name, self.seed = preset, seed
        self.family = family_of_preset(preset)
        self.configs = FAMILY_PRESETS[self.family.name][0].preset_configs(preset)

    def load(self, component: str) -> torch.nn.Module:
        torch.manual_seed(self.seed)  # construction-time init is overwritten, but keep it quiet and fixed
        module = _build(component, self.configs[component])
        randomize_parameters(module, self.seed + zlib.crc32(component.encode()))
        return _finish(module)

    def write_tokenizer(self, out_dir: Path) -> dict:
        from eclipse_export.export.tokenizer_files import write_tokenizer_files

        # Random presets still use the real CLIP BPE vocabulary (open_clip ships it offline).
        return write_tokenizer_files(out_dir, None)

    def describe(self) -> dict:
        return {"kind": "random", "preset": self.name, "seed": self.seed, "configs": self.configs}


class PretrainedSource(StackSource):
    """The real stack: hub ids (downloaded once, pinned to the resolved commit) or local dirs.

    Each location is a hub repository id or a local directory laid out like that repository
    (with the same subfolders). Weights load from safetensors; pickled .bin weights load only
    with allow_pickle=True, because unpickling runs arbitrary code from the file.
    """

    # per family (export/karlo.py subclasses this with its own): where each component lives, which
    # configs to read; kandinsky22 and lambda are chosen by `preset`
    hub_sources = presets.HUB_SOURCES
    config_components = ("text_encoder", "prior", "unet", "movq", "scheduler")
    preset = "kandinsky22"

    def __init__(self, locations: dict[str, str] | None = None, allow_pickle: bool = False,
                 preset: str | None = None):
        if preset is not None:
            if preset not in REAL_PRESETS:
                raise SourceError(f"unknown preset {preset!r} (choose from {', '.join(REAL_PRESETS)})")
            self.preset = preset
            self.family = family_of_preset(preset)
            self.hub_sources = FAMILY_PRESETS[self.family.name][0].HUB_SOURCES
        self.name = self.preset
        self.allow_pickle = allow_pickle
        self.locations = {k: v[0] for k, v in self.hub_sources.items()}
        self.locations.update({k: v for k, v in (locations or {}).items() if v})
        unknown = set(self.locations) - set(self.hub_sources)
        if unknown:
            raise SourceError(f"unknown component location(s): {', '.join(sorted(unknown))}")
        self._resolved: dict[str, tuple[Path, str | None]] = {}
        # Catch a mistyped local path before spending minutes downloading the other components.
        for component, location in self.locations.items():
            if location.startswith((".", "/", "~")) and not Path(location).expanduser().is_dir():
                raise SourceError(f"{component}: {location} is not a directory")
        needed = list(self.config_components)
        if self.family.name == "lambda":  # its dims include the image size; its bundles ship the processor config
            needed += ["image_encoder", "image_processor"]
        self.configs = {c: self._read_config(c) for c in needed}

    # -- locating files --
    def _root(self, component: str) -> tuple[Path, str | None]:
        """Local directory of a component's repository and the commit it was resolved to."""
        location = self.locations[component]
        if location not in self._resolved:
            path = Path(location).expanduser()
            if path.is_dir():
                self._resolved[location] = (path.resolve(), None)
            elif path.exists() or location.startswith((".", "/", "~")):
                raise SourceError(f"{component}: {location} is not a directory")
            else:
                self._resolved[location] = self._download(location)
        return self._resolved[location]

    def _download(self, repo_id: str) -> tuple[Path, str]:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.txt", "*.safetensors"] + (["*.bin"] if self.allow_pickle else [])
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as e:  # network, auth, missing repo: one line for the user
            raise SourceError(f"cannot download {repo_id} from the Hugging Face hub: {type(e).__name__}: {e}") from e
        return folder, folder.name  # snapshot folders are named by the resolved commit

    def _dir(self, component: str) -> Path:
        root, _ = self._root(component)
        sub = self.hub_sources[component][1]
        path = root / sub if sub else root
        if not path.is_dir():
            raise SourceError(f"{component}: expected a directory {path}")
        return path

    def _read_config(self, component: str) -> dict:
        folder = self._dir(component)
        name = ("scheduler_config.json" if component.endswith("scheduler") else
                "preprocessor_config.json" if component == "image_processor" else "config.json")
        try:
            config = json.loads((folder / name).read_text())
        except (OSError, ValueError) as e:
            raise SourceError(f"{component}: cannot read {folder / name}: {e}") from e
        if component == "text_encoder":
            config = config.get("text_config", config)
            # Older revisions of the laion config lack projection_dim; ECLIPSE uses 1280.
            config.setdefault("projection_dim", 1280)
            if config.get("projection_dim") is None:
                config["projection_dim"] = 1280
        return config

    def _check_weights(self, component: str) -> None:
        folder = self._dir(component)
        if any(folder.glob("*.safetensors")):
            return
        if any(folder.glob("*.bin")):
            if self.allow_pickle:
                return
            raise SourceError(
                f"{component}: {folder} has only pickled .bin weights; pass --allow-pickle if you trust them"
            )
        raise SourceError(f"{component}: no weights (*.safetensors) in {folder}")

    def load(self, component: str) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel, VQModel
        from transformers import (
            CLIPTextModelWithProjection,
            CLIPVisionModelWithProjection,
        )

        self._check_weights(component)
        folder = self._dir(component)
        safetensors_only = not self.allow_pickle
        if component == "text_encoder":
            module = CLIPTextModelWithProjection.from_pretrained(
                folder, projection_dim=self.configs["text_encoder"]["projection_dim"], use_safetensors=safetensors_only or None
            )
        elif component == "image_encoder":
            module = CLIPVisionModelWithProjection.from_pretrained(folder, use_safetensors=safetensors_only or None)
        else:
            cls = {"prior": prior_class(self.configs["prior"]), "unet": UNet2DConditionModel, "movq": VQModel}[component]
            module = cls.from_pretrained(folder, use_safetensors=safetensors_only or None)
        return _finish(module.float())

    def scheduler_config(self) -> dict:
        return dict(self.configs["scheduler"])

    def write_tokenizer(self, out_dir: Path) -> dict:
        from eclipse_export.export.tokenizer_files import write_tokenizer_files

        return write_tokenizer_files(out_dir, self._dir("tokenizer"))

    def describe(self) -> dict:
        out = {"kind": "pretrained", "preset": self.name, "allow_pickle": self.allow_pickle, "components": {}}
        for component, location in sorted(self.locations.items()):
            root, revision = self._root(component)
            out["components"][component] = {
                "location": location,
                "subfolder": self.hub_sources[component][1],
                "revision": revision,
                "path": str(root),
            }
        return out


def make_source(preset: str, seed: int = 0, locations: dict[str, str] | None = None, allow_pickle: bool = False) -> StackSource:
    if preset in RANDOM_PRESETS:
        return RandomSource(preset, seed)
    if preset in REAL_PRESETS:
        return PretrainedSource(locations, allow_pickle=allow_pickle, preset=preset)
    raise SourceError(f"unknown preset {preset!r} (choose from {', '.join(RANDOM_PRESETS + REAL_PRESETS)})")


def source_from_manifest(described: dict) -> StackSource:
    """Rebuild the source a bundle was exported from (for the PyTorch reference)."""
    if described.get("kind") == "random":
        return RandomSource(described["preset"], int(described["seed"]))
    if described.get("kind") == "pretrained":
        locations = {}
        for component, entry in described["components"].items():
            # Prefer the exact folder used at export; fall back to the hub id.
            locations[component] = entry["path"] if Path(entry["path"]).is_dir() else entry["location"]
        return PretrainedSource(locations, allow_pickle=bool(described.get("allow_pickle")),
                                preset=described.get("preset", "kandinsky22"))
    raise SourceError(f"the bundle's manifest names an unknown source kind {described.get('kind')!r}")
