"""Runtime vs PyTorch reference on the same request and the same noises: the parity report."""

from __future__ import annotations

import gc

from eclipse_export.families import get_family
from eclipse_export.families.spec import MIN_IMAGE_PSNR_DB
from eclipse_export.metrics.parity import ParityReport, compare, psnr
from eclipse_export.runtime.bundle import Bundle
from eclipse_export.runtime.images import to_uint8
from eclipse_export.runtime.pipeline import Generation, Pipeline

# Stage outputs after the sampling loop: bounded by cosine + image PSNR (Tolerance.chained).
CHAINED = ("unet.latents", "movq.image")

# Stage outputs compared, in chain order (names as in Generation.intermediates).
STAGES = (
    "text_encoder.text_embeds",
    "text_encoder.text_hidden_states",
    "prior.image_embeds",
    "prior.negative_image_embeds",
    "unet.noise_pred_step0",
    "unet.latents",
    "movq.image",
)


def lambda_stages(outputs: dict) -> tuple[str, ...]:
    """λ-ECLIPSE: the image encoder once per subject (and for the edge map), the interleaved text
    states the prior reads, then the Kandinsky stages."""
    subjects = sorted((k for k in outputs if k.startswith("image_encoder.subject")), key=lambda k: int(k[21:]))
    return (*STAGES[:2], *subjects, "image_encoder.control", "prior.text_hidden_states", *STAGES[2:])


def final_image_stage(family: str) -> str:
    """The stage output that is the image (what the 8-bit images are compared against)."""
    if family == "karlo":
        from eclipse_export.verify.karlo_reference import STAGES as KARLO_STAGES

        return KARLO_STAGES[-1]
    return STAGES[-1]


def reference_for(bundle: Bundle, device: str = "cpu", keep_loaded: bool = False):
    """The PyTorch reference rebuilt from the bundle's recorded source (weights checked); for
    every family `.run(request, noises)` -> (stage outputs, seconds per stage)."""
    from eclipse_export.export.source_factory import source_from_manifest
    from eclipse_export.verify.reference import ReferencePipeline

    if bundle.family.name == "karlo":
        if device != "cpu":
            raise ValueError("the Karlo reference runs on the CPU only")
        from eclipse_export.verify import karlo_reference

        return karlo_reference.reference_for(bundle, keep_loaded=keep_loaded)
    manifest = bundle.manifest
    weights = {name: entry.get("weights_sha256") for name, entry in manifest["components"].items()}
    args = (source_from_manifest(manifest["source"]), bundle.path("tokenizer/tokenizer.json").parent,
            bundle.json("scheduler_config.json"))
    kwargs = dict(expected_weights=weights, device=device, keep_loaded=keep_loaded)
    if bundle.family.name == "lambda":
        from eclipse_export.families.lambda_eclipse import IMAGE_PROCESSOR_FILE
        from eclipse_export.verify.reference_lambda import LambdaReferencePipeline

        return LambdaReferencePipeline(*args, image_processor_dir=bundle.path(IMAGE_PROCESSOR_FILE).parent, **kwargs)
    return ReferencePipeline(*args, **kwargs)


def parity_report(outputs: dict, images, reference: dict, precision: str, timings: dict | None = None,
                  ref_timings: dict | None = None, family: str = "kandinsky22") -> ParityReport:
    """Stage outputs + 8-bit images of a run vs the reference's stage outputs."""
    if family == "karlo":
        from eclipse_export.verify import karlo_reference

        return karlo_reference.parity_report(outputs, images, reference, precision)
    timings, ref_timings = timings or {}, ref_timings or {}
    components = get_family(family).components
    stages = lambda_stages(outputs) if family == "lambda" else STAGES
    report = ParityReport(precision=precision, min_image_psnr_db=MIN_IMAGE_PSNR_DB[precision])
    for stage in stages:
        component = stage.split(".")[0]
        tol = components[component].tolerance(precision)
        if stage in CHAINED:
            tol = tol.chained()
        m = compare(stage, outputs[stage], reference[stage], tol)
        # latency belongs to a component (the image encoder's: to each subject), so report it on
        # its last row only
        own = timings.get(stage) if stage.startswith("image_encoder.") else None
        last = stage == [s for s in stages if s.startswith(component + ".")][-1]
        if own is not None or last:
            key = stage if own is not None else component
            m = type(m)(**{**m.__dict__, "seconds": timings.get(key), "ref_seconds": ref_timings.get(key)})
        report.stages.append(m)
    report.image_psnr_db = psnr(images, to_uint8(reference["movq.image"]))
    return report


def compare_with_reference(pipeline: Pipeline, generation: Generation, device: str = "cpu") -> tuple[ParityReport, dict]:
    """Run the reference on the generation's request and noises; returns (report, reference timings)."""
    if pipeline.bundle.family.name == "karlo":
        from eclipse_export.verify.karlo_reference import compare_karlo

        return compare_karlo(pipeline, generation)
    reference = reference_for(pipeline.bundle, device)
    outputs, timings = reference.run(generation.request, generation.noises)
    report = parity_report(generation.intermediates, generation.images, outputs, pipeline.bundle.precision,
                           generation.timings, timings, family=pipeline.bundle.family.name)
    del reference, outputs
    gc.collect()
    return report, timings
