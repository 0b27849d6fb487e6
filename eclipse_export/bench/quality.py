"""The quality report of eclipse-bench: parity of a target against torch-fp32 over a prompt set."""

from __future__ import annotations

import math

import numpy as np

from eclipse_export.families.spec import MIN_IMAGE_PSNR_DB
from eclipse_export.metrics.ssim import ssim


def quality_outputs(runner, config, driver, make_request) -> list:
    """(stage outputs, images) of one runner over config.quality_prompts, seed per prompt."""
    out = []
    for i, prompt in enumerate(config.quality_prompts):
        req = make_request(config, prompt, config.seed + i)
        _, outputs, images = runner.run(req, driver.noises_for(req))
        out.append((outputs, images))
    return out


def quality_summary(outs: list, reference: list, precision: str, family: str = "kandinsky22") -> dict:
    """Per stage: worst and mean cosine, worst max abs; image PSNR (min, mean) and SSIM (mean)."""
    from eclipse_export.verify.compare import parity_report

    enforced = precision in MIN_IMAGE_PSNR_DB
    stages: dict[str, dict] = {}
    psnrs, ssims, failures = [], [], []
    for i, ((outputs, images), ref) in enumerate(zip(outs, reference)):
        report = parity_report(outputs, images, ref[0], precision if enforced else "fp32", family=family)
        for m in report.stages:
            st = stages.setdefault(m.stage, {"cosine_min": 1.0, "cosine_sum": 0.0, "max_abs": 0.0, "n": 0})
            st["cosine_min"] = min(st["cosine_min"], m.cosine)
            st["cosine_sum"] += m.cosine
            st["max_abs"] = max(st["max_abs"], m.max_abs)
            st["n"] += 1
        psnrs.append(report.image_psnr_db)
        ssims.append(ssim(images, ref[1]))
        if enforced and not report.ok:
            failures.append(f"prompt {i}: " + "; ".join([f"{m.stage} {', '.join(m.failures)}" for m in report.stages
                                                         if m.failures] + ([report.image_failure] if report.image_failure else [])))
    for st in stages.values():
        st["cosine_mean"] = st.pop("cosine_sum") / st["n"]
    finite = [p for p in psnrs if p != "inf" and math.isfinite(p)]
    return {"prompts": len(outs), "enforced": enforced, "stages": stages,
            "image_psnr_db": {"min": min(finite) if finite else "inf", "mean": float(np.mean(finite)) if finite else "inf"},
            "image_ssim_mean": float(np.mean(ssims)), "failures": failures, "ok": not failures}
