"""A model family as data: its components (specs) and the chain that connects them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from eclipse_export.families.spec import ComponentSpec


@dataclass(frozen=True)
class Stage:
    """One graph call of the chain. `inputs` maps each graph input to the value that feeds it:
    "component.output" for another stage's output, or a name the family's driver provides
    ("tokens.input_ids", "noise.prior", "loop.sample", ...). A `loop` stage is the denoiser,
    called once per sampler step by the driver."""

    component: str
    inputs: Mapping[str, str]
    loop: bool = False


@dataclass(frozen=True)
class Calibration:
    """How INT8 calibration (export/calibrate.py) drives the family's chain. The runtime runs the
    chain on the calibration prompts and every graph call's inputs are recorded; a denoiser
    called many times per prompt is recorded at a few calls, stratified over them (see
    `sampled`), so that the prompts together cover its whole trajectory without one prompt's
    steps dominating the set."""

    # quantized when the user names none (--int8-components): the graphs where the time goes (the
    # looped UNets); the one-pass graphs (text encoder, prior, projections) stay in the precision
    # of the unquantized bundle (FP32 graphs; their engines as the target builds them)
    components: tuple[str, ...]
    # components recorded at CaptureOptions.loop_calls_per_prompt calls per prompt, stratified
    # over the calls the chain made; the others at every call
    sampled: tuple[str, ...] = ()
    # requests carry subject images (drawn by the project, one per prompt, an edge map every
    # other prompt): the image encoder and the control token see real inputs
    subjects: bool = False


@dataclass(frozen=True)
class Family:
    name: str  # the manifest's "family"
    title: str
    components: Mapping[str, ComponentSpec]  # in chain order
    chain: tuple[Stage, ...]
    # the static dims every bundle of the family records (see the components' shape symbols)
    dim_names: tuple[str, ...]
    # files the driver opens by name, besides the graphs (the manifest must list them)
    required_files: tuple[str, ...]
    presets: tuple[str, ...]
    # default image size of the chain (height, width)
    default_size: tuple[int, int] = (512, 512)
    # INT8 calibration (None: the family has no INT8 targets)
    calibration: Calibration | None = None
    # the seconds a driver records per generation (Generation.timings keys), in chain order;
    # () : one per component. A stage may time several graphs (Karlo's super-resolution loop runs
    # two) or host work (Karlo's upsample); "<stage>.<part>" keys under a stage (λ's image
    # encoder per subject) are parts of it. eclipse-bench reports these.
    timed: tuple[str, ...] = ()

    def __post_init__(self):
        names = [s.component for s in self.chain]
        if names != list(self.components):
            raise ValueError(f"{self.name}: the chain calls {names}, the components are {list(self.components)}")
        for stage in self.chain:
            spec = self.components[stage.component]
            if set(stage.inputs) != set(spec.input_names):
                raise ValueError(f"{self.name}.{stage.component}: the chain feeds {sorted(stage.inputs)}, "
                                 f"the graph takes {sorted(spec.input_names)}")
        if self.calibration is not None:
            named = set(self.calibration.components) | set(self.calibration.sampled)
            unknown = sorted(named - set(self.components))
            if unknown:
                raise ValueError(f"{self.name}: calibration names unknown components {unknown}")

    @property
    def loop_stage(self) -> Stage:
        return next(s for s in self.chain if s.loop)

    @property
    def timed_stages(self) -> tuple[str, ...]:
        return self.timed or tuple(self.components)

    @property
    def per_step_timing(self) -> str:
        """The timings key of the denoising loop's mean seconds per step."""
        return f"{self.loop_stage.component}_per_step"

    @property
    def takes_subjects(self) -> bool:
        """Whether a request needs subject images (a stage is fed from "subject.*")."""
        return any(v.startswith("subject.") for s in self.chain for v in s.inputs.values())
