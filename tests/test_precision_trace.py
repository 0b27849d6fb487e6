"""precision_trace finds the op that amplifies reduced-precision error; the shipped FP16 UNet has none."""

from __future__ import annotations

import numpy as np

from eclipse_export.families.kandinsky22.components import COMPONENTS
from eclipse_export.runtime.bundle import open_bundle
from eclipse_export.verify.precision_trace import amplifiers, main, trace

# a large timestep: where t * freq in FP16 is furthest off
TIMESTEP = 751.0


def _feed(bundle):
    spec = COMPONENTS["unet"]
    dims = dict(bundle.dims, B=2, h=8, w=8)
    feed = spec.sample_inputs(dims, np.random.default_rng(0))
    feed["timestep"] = np.array([TIMESTEP], np.float32)
    return feed


def test_trace_points_at_the_timestep_embedding_when_it_is_fp16(tiny_bundle, tmp_path):
    """The conversion before the fix (norms FP32, Sin/Cos FP16): the trace must name them."""
    from eclipse_export.export.fp16 import convert_to_fp16
    from eclipse_export.families.spec import NORMS as _NORMS

    ref = open_bundle(tiny_bundle)
    naive = tmp_path / "unet.onnx"
    convert_to_fp16(ref.graph_path("unet"), naive, _NORMS, external=False)
    rows = trace(ref.graph_path("unet"), naive, _feed(ref))
    top = amplifiers(rows, 2)
    assert {r.op_type for r in top} == {"Sin", "Cos"} and min(r.amplification for r in top) > 10
    assert rows[-1].tensor == "noise_pred"


def test_shipped_fp16_unet_has_no_amplifier(tiny_bundle, tiny_fp16_bundle):
    ref, fp16 = open_bundle(tiny_bundle), open_bundle(tiny_fp16_bundle)
    rows = trace(ref.graph_path("unet"), fp16.graph_path("unet"), _feed(ref))
    assert len(rows) > 100 and all(r.finite for r in rows)
    worst = amplifiers(rows, 1)[0]
    assert worst.amplification < 5, worst
    assert rows[-1].rel_error < 3e-3


def test_cli(tiny_bundle, tiny_fp16_bundle, capsys):
    assert main(["--reference", str(tiny_bundle), "--bundle", str(tiny_fp16_bundle), "--component", "text_encoder",
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    amplifying, _, constants = out.partition("constants changed beyond FP16 rounding")
    assert amplifying.startswith("text_encoder: ") and "amplif." in amplifying
    # CLIP's causal mask holds float32's minimum, which FP16 clamps to -65504: reported as a
    # changed constant, not as an amplifier (a constant has no input error to amplify)
    assert " Constant " not in amplifying and " Constant " in constants
    # the reference must be the FP32 bundle
    assert main(["--reference", str(tiny_fp16_bundle), "--bundle", str(tiny_bundle), "--component", "prior"]) == 2
    assert "must be an fp32 bundle" in capsys.readouterr().err
