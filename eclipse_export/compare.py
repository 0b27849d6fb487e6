"""Runtime vs PyTorch reference on the same request and the same noises: the parity report."""

from __future__ import annotations

import gc

from .parity import ParityReport, compare, psnr
from .runtime.images import to_uint8
from .runtime.pipeline import Generation, Pipeline
from .specs import COMPONENTS, MIN_IMAGE_PSNR_DB

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


def reference_for(pipeline: Pipeline, device: str = "cpu"):
    from .reference import ReferencePipeline
    from .sources import source_from_manifest

    manifest = pipeline.bundle.manifest
    weights = {name: entry.get("weights_sha256") for name, entry in manifest["components"].items()}
    return ReferencePipeline(source_from_manifest(manifest["source"]), pipeline.bundle.path("tokenizer"),
                             pipeline.scheduler_config, expected_weights=weights, device=device)


def parity_report(generation: Generation, reference: dict, ref_timings: dict, precision: str) -> ParityReport:
    report = ParityReport(precision=precision, min_image_psnr_db=MIN_IMAGE_PSNR_DB[precision])
    for stage in STAGES:
        component = stage.split(".")[0]
        tol = COMPONENTS[component].tolerance(precision)
        if stage in CHAINED:
            tol = tol.chained()
        m = compare(stage, generation.intermediates[stage], reference[stage], tol)
        # latency belongs to a component, so report it on its last row only
        last = stage == [s for s in STAGES if s.startswith(component + ".")][-1]
        if last:
            m = type(m)(**{**m.__dict__, "seconds": generation.timings.get(component),
                           "ref_seconds": ref_timings.get(component)})
        report.stages.append(m)
    report.image_psnr_db = psnr(generation.images, to_uint8(reference["movq.image"]))
    return report


def compare_with_reference(pipeline: Pipeline, generation: Generation, device: str = "cpu") -> tuple[ParityReport, dict]:
    """Run the reference on the generation's request and noises; returns (report, reference timings)."""
    reference = reference_for(pipeline, device)
    outputs, timings = reference.run(generation.request, generation.noises)
    report = parity_report(generation, outputs, timings, pipeline.bundle.precision)
    del reference, outputs
    gc.collect()
    return report, timings
