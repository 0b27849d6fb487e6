"""Parity between a backend's outputs and the PyTorch reference: metrics, reports, typed errors.

Checks go names -> shapes -> values and collect every failure before raising, so one run tells
the whole story. Numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from eclipse_export.families.spec import Tolerance


@dataclass(frozen=True)
class Metrics:
    stage: str  # e.g. "unet.noise_pred"
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    cosine: float
    finite: bool
    failures: tuple[str, ...] = ()
    seconds: float | None = None  # backend latency of the stage, when measured
    ref_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a64 @ b64 / (na * nb))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two images on the same scale (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def compare(stage: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> Metrics:
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return Metrics(stage, actual.shape, math.nan, math.nan, math.nan, False,
                       (f"shape {actual.shape} != reference {expected.shape}",))
    finite = bool(np.isfinite(actual).all())
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    cos = cosine(actual, expected)
    failures = []
    if not finite:
        failures.append("NaN/Inf in output")
    if not cos >= tol.min_cosine:
        failures.append(f"cosine {cos:.7f} < {tol.min_cosine}")
    if tol.max_abs is not None and not max_abs <= tol.max_abs:
        failures.append(f"max abs {max_abs:.3e} > {tol.max_abs:.1e}")
    return Metrics(stage, actual.shape, max_abs, mean_abs, cos, finite, tuple(failures))


def compare_outputs(component: str, actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                    tol: Tolerance) -> list[Metrics]:
    """All outputs of one component; missing/extra names are failures too."""
    out = []
    for name in sorted(set(expected) - set(actual)):
        out.append(Metrics(f"{component}.{name}", (), math.nan, math.nan, math.nan, False, ("missing output",)))
    for name in sorted(set(actual) - set(expected)):
        out.append(Metrics(f"{component}.{name}", (), math.nan, math.nan, math.nan, False, ("unexpected output",)))
    for name in [n for n in expected if n in actual]:
        out.append(compare(f"{component}.{name}", actual[name], expected[name], tol))
    return out


class ParityError(AssertionError):
    """One or more parity checks failed; `report` holds every check, passing or not."""

    def __init__(self, report: "ParityReport"):
        self.report = report
        lines = [f"{m.stage}: {', '.join(m.failures)}" for m in report.stages if m.failures]
        if report.image_failure:
            lines.append(report.image_failure)
        super().__init__(f"{len(lines)} parity check(s) failed: " + "; ".join(lines))


@dataclass
class ParityReport:
    precision: str
    stages: list[Metrics] = field(default_factory=list)
    image_psnr_db: float | None = None
    min_image_psnr_db: float | None = None

    @property
    def image_failure(self) -> str | None:
        if self.image_psnr_db is None or self.min_image_psnr_db is None:
            return None
        if self.image_psnr_db >= self.min_image_psnr_db:
            return None
        return f"image PSNR {self.image_psnr_db:.2f} dB < {self.min_image_psnr_db} dB"

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.stages) and self.image_failure is None

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise ParityError(self)

    def table(self) -> str:
        head = f"{'stage':<32} {'shape':<20} {'max abs':>10} {'mean abs':>10} {'cosine':>12} {'backend s':>10} {'torch s':>9}  ok"
        rows = [head, "-" * len(head)]
        for m in self.stages:
            sec = "" if m.seconds is None else f"{m.seconds:.4f}"
            ref = "" if m.ref_seconds is None else f"{m.ref_seconds:.4f}"
            rows.append(
                f"{m.stage:<32} {str(m.shape):<20} {m.max_abs:>10.2e} {m.mean_abs:>10.2e} {m.cosine:>12.8f} "
                f"{sec:>10} {ref:>9}  {'yes' if m.ok else 'NO: ' + '; '.join(m.failures)}"
            )
        if self.image_psnr_db is not None:
            ok = self.image_failure is None
            rows.append(
                f"{'image (8-bit PNG) PSNR':<32} {self.image_psnr_db:.2f} dB (bound {self.min_image_psnr_db} dB)"
                f"  {'yes' if ok else 'NO'}"
            )
        return "\n".join(rows)

    def to_json(self) -> dict:
        def num(x):
            return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

        return {
            "precision": self.precision,
            "ok": self.ok,
            "image_psnr_db": "inf" if self.image_psnr_db == math.inf else num(self.image_psnr_db),
            "min_image_psnr_db": self.min_image_psnr_db,
            "stages": [
                {"stage": m.stage, "shape": list(m.shape), "max_abs": num(m.max_abs), "mean_abs": num(m.mean_abs),
                 "cosine": num(m.cosine), "finite": m.finite, "failures": list(m.failures),
                 "seconds": m.seconds, "ref_seconds": m.ref_seconds}
                for m in self.stages
            ],
        }
