"""Benchmark results as a table, ratios, Markdown, a chart and JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

# the stages timed per run, in chain order, when results do not name them (Kandinsky 2.2's; a
# run records its family's Family.timed_stages in results["stages"])
STAGES = ("text_encoder", "prior", "unet", "movq")
PER_STEP = "unet_per_step"


def stages_of(results: dict) -> tuple[str, ...]:
    return tuple(results.get("stages") or STAGES)


def parts_of(results: dict, e: dict) -> list[str]:
    """A target's per-part timings (the image encoder per subject: "image_encoder.subject0", ...)."""
    stages = stages_of(results)
    return [k for k in e.get("latency", {}) if "." in k and k.split(".")[0] in stages]


def parts_markdown(results: dict) -> list[str]:
    rows = [(key, parts_of(results, e)) for key, e in results["targets"].items() if "latency" in e]
    rows = [(key, parts) for key, parts in rows if parts]
    if not rows:
        return []
    subjects = results.get("config", {}).get("subjects") or []
    named = ", ".join(f"subject{i} = {keyword!r} ({Path(path).name})" for i, (path, keyword) in enumerate(subjects))
    out = ["", "Per-call latency within a stage (p50 ms; one image-encoder call per subject image"
           + (f": {named}" if named else "") + "):", ""]
    for key, parts in rows:
        lat = results["targets"][key]["latency"]
        out.append(f"- {key}: " + ", ".join(f"{k} {lat[k]['p50'] * 1e3:.1f}" for k in parts))
    return out


def quality_markdown(results: dict) -> list[str]:
    if not results.get("quality"):
        return []
    n = next(iter(results["quality"].values()))["prompts"]
    out = ["", f"Quality against torch-fp32 over {n} prompts (worst / mean stage cosine, worst max abs; image PSNR "
           "min / mean, mean SSIM):", ""]
    for target, q in results["quality"].items():
        stages = "; ".join(f"{k} {v['cosine_min']:.5f} / {v['cosine_mean']:.5f}, {v['max_abs']:.3g}" for k, v in q["stages"].items())
        psnr = q["image_psnr_db"]
        out.append(f"- {target}: {stages}; image PSNR {psnr['min']:.1f} / {psnr['mean']:.1f} dB, SSIM {q['image_ssim_mean']:.4f}"
                   f"{'' if q['ok'] else ' (FAILS its tolerance)'}")
    return out


def parity_markdown(results: dict) -> list[str]:
    """Every compared stage output of every target against torch-fp32 (cosine, max abs), and the
    end-to-end image PSNR / SSIM."""
    rows = [(key, e["parity"]) for key, e in results["targets"].items() if e.get("parity")]
    if not rows:
        return []
    out = ["", "Parity against torch-fp32 per stage output (cosine / max abs; first run, same noises):", ""]
    for key, parity in rows:
        def num(x, fmt):  # None: not finite (to_json writes NaN/Inf so)
            return "non-finite" if x is None else x if isinstance(x, str) else format(x, fmt)

        stages = "; ".join(f"{m['stage']} {num(m['cosine'], '.6f')} / {num(m['max_abs'], '.2g')}"
                           for m in parity["stages"])
        ssim = parity.get("image_ssim")
        out.append(f"- {key}: {stages}; image PSNR {num(parity['image_psnr_db'], '.1f')} dB"
                   + (f", SSIM {ssim:.4f}" if ssim is not None else "") + ("" if parity.get("ok") else " (FAILS)"))
    return out


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)




def _parity_cells(e: dict) -> tuple[str, str]:
    """(worst stage cosine, image PSNR) against torch-fp32: "ref" for the reference itself, "n/a"
    where no reference ran (--no-torch, or a machine without torch)."""
    parity = e.get("parity")
    if parity is None:
        return ("ref", "ref") if e["target"] == "torch-fp32" else ("n/a", "n/a")
    psnr = parity["image_psnr_db"]
    return f"{min(s['cosine'] for s in parity['stages']):.6f}", "inf" if psnr == "inf" else f"{psnr:.1f}"


def columns_of(stages: tuple[str, ...] = STAGES, per_step: str = PER_STEP) -> dict:
    """column -> (header, width, cell): one column per timed stage of the family, then the rest."""
    return {
        **{s: (f"{s} p50 ms", max(18, len(s) + 9), (lambda s: lambda e: f"{e['latency'][s]['p50'] * 1e3:.1f}")(s))
           for s in stages},
        "step": ("step p50 ms", 13, lambda e: f"{e['latency'][per_step]['p50'] * 1e3:.1f}"),
        **{k: v for k, v in _OTHER_COLUMNS.items() if k != "step"},
    }


# the table's columns besides the stages, chosen with eclipse-bench --columns
_OTHER_COLUMNS = {
    "total": ("total p50 s", 13, lambda e: f"{e['latency']['total']['p50']:.3f}"),
    "img/s": ("img/s", 8, lambda e: f"{e['latency']['images_per_second']:.2f}"),
    "load": ("load s", 8, lambda e: f"{e['load_seconds']:.2f}"),
    "peak": ("peak GiB", 10, lambda e: f"{(e['peak_host_bytes'] or 0) / 2**30:.2f}"),
    "cos": ("cos min", 10, lambda e: _parity_cells(e)[0]),
    "psnr": ("PSNR dB", 9, lambda e: _parity_cells(e)[1]),
}
# Kandinsky 2.2's columns (the --help text; a run's table has its family's, see columns_of)
COLUMNS = columns_of()
# what fits an 80-column terminal (a board's serial console): the full table is ~170 wide
COMPACT_COLUMNS = ("step", "total", "peak", "cos", "psnr")


def table(results: dict, columns: tuple[str, ...] | None = None, width: int | None = None) -> str:
    """The results table. columns None: all of them, or COMPACT_COLUMNS when the full table is
    wider than `width` (the terminal's); long skip reasons wrap at `width`."""
    import textwrap

    keys = list(results["targets"])
    w = max([14] + [len(k) + 2 for k in keys])
    cols = columns_of(stages_of(results), results.get("per_step", PER_STEP))
    if columns is None:
        columns = tuple(cols)
        if width is not None and w + sum(cols[c][1] for c in columns) > width:
            columns = COMPACT_COLUMNS
    head = f"{'target/batch':<{w}}" + "".join(f"{cols[c][0]:>{cols[c][1]}}" for c in columns)
    rows = [head, "-" * len(head)]
    for key, e in results["targets"].items():
        if "skipped" in e:
            text = f"{key:<{w}}skipped: {e['skipped']}"
            rows += textwrap.wrap(text, width, subsequent_indent=" " * (w + 2)) if width else [text]
            continue
        rows.append(f"{key:<{w}}" + "".join(f"{cols[c][2](e):>{cols[c][1]}}" for c in columns))
    return "\n".join(rows)


def ratios(results: dict, base: str = "torch-fp32") -> list[str]:
    lines = []
    for key, e in results["targets"].items():
        target, batch = key.split("/")
        ref = results["targets"].get(f"{base}/{batch}")
        if target == base or "latency" not in e or not ref or "latency" not in ref:
            continue
        parts = [f"{s} {ref['latency'][s]['p50'] / e['latency'][s]['p50']:.2f}x"
                 for s in (*stages_of(results), "total") if e["latency"][s]["p50"] > 0]
        lines.append(f"{key}: speed-up vs {base}: " + ", ".join(parts))
    return lines


def _load_note(env: dict) -> str:
    """The shared-cores caveat, only when the 1-minute load was above the core count."""
    loads = [x[0] for x in (env.get("loadavg_at_start"), env.get("loadavg_at_end")) if x]
    cores = env.get("cpu_count")
    if cores and loads and max(loads) > cores:
        return " (above the core count: other work shared the cores, so compare ratios within the run)"
    return ""


def markdown(results: dict) -> str:
    env = results["environment"]
    out = ["# eclipse-bench results", "",
           f"- model family: {results.get('family', 'kandinsky22')}",
           f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} logical cores), {env.get('platform')}",
           f"- GPU: {env.get('gpu') or 'none'}",
           f"- versions: {', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items())}",
           f"- request: {json.dumps({k: results['config'][k] for k in ('height', 'width', 'steps', 'guidance', 'runs', 'warmup')})}",
           f"- complete: {results['complete']}",
           f"- load average (1/5/15 min) at start {env.get('loadavg_at_start')}, at end {env.get('loadavg_at_end')}"
           + _load_note(env), "",
           "```", table(results), "```", ""]
    out += ["Speed-up of each target over torch-fp32 (p50, same inputs, same run):", ""]
    out += [f"- {line}" for line in ratios(results)] or ["- (no torch-fp32 baseline in this run)"]
    flops = [f"- {key}: " + ", ".join(f"{s} {v:.3f}" for s, v in e["tflops_achieved"].items())
             for key, e in results["targets"].items() if "tflops_achieved" in e]
    if flops:  # not counted for every family (runner.stage_flops)
        out += ["", "FLOPs per generation (MatMul/Gemm/Conv only) and achieved TFLOP/s at p50:", "", *flops]
    out += parts_markdown(results)
    out += parity_markdown(results)
    out += quality_markdown(results)
    if results["failures"]:
        out += ["", "## Parity failures", ""] + [f"- {f}" for f in results["failures"]]
    return "\n".join(out) + "\n"


def chart(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [k for k, e in results["targets"].items() if "latency" in e]
    fig, ax = plt.subplots(figsize=(9, 1 + 0.5 * len(keys)))
    left = np.zeros(len(keys))
    for stage in stages_of(results):
        values = np.array([results["targets"][k]["latency"][stage]["p50"] for k in keys])
        ax.barh(keys, values, left=left, label=stage)
        left += values
    ax.set_xlabel("p50 latency per generation (s)")
    ax.set_title("eclipse-bench: latency per stage")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare_results(a: dict, b: dict) -> str:
    rows = [f"{'target/batch':<28}{'stage':<14}{'A p50 ms':>12}{'B p50 ms':>12}{'B/A':>8}"]
    for key in sorted(set(a["targets"]) & set(b["targets"])):
        ea, eb = a["targets"][key], b["targets"][key]
        if "latency" not in ea or "latency" not in eb:
            continue
        for stage in (*stages_of(a), "total"):
            pa, pb = ea["latency"][stage]["p50"], eb["latency"][stage]["p50"]
            rows.append(f"{key:<28}{stage:<14}{pa * 1e3:>12.1f}{pb * 1e3:>12.1f}{pb / pa:>8.2f}")
    return "\n".join(rows)
