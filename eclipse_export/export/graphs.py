"""The exact functions that become ONNX graphs: one thin torch wrapper per component spec.

Each wrapper takes the spec's inputs in order (same names, dtypes) and returns its outputs in
order. Cheap glue goes inside the graph when it saves host work: the UNet returns only the
noise channels, the MoVQ returns the post-processed NHWC image in [0,1].
"""

from __future__ import annotations

import torch
from torch import nn

from eclipse_export.export import karlo_graphs
from eclipse_export.families import DEFAULT_FAMILY, get_family
from eclipse_export.families.kandinsky22.components import COMPONENTS


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        # No attention mask, as in Kandinsky's prior pipeline: CLIP's causal mask already hides
        # the padding from every position up to eos, and pooling reads the eos position.
        out = self.text_encoder(input_ids=input_ids)
        return out.text_embeds, out.last_hidden_state


class PriorGraph(nn.Module):
    def __init__(self, prior):
        super().__init__()
        self.prior = prior

    def forward(self, noise, text_embeds, text_hidden_states, attention_mask):
        return self.prior(noise, text_embeds, text_hidden_states, attention_mask.bool())


class UNetGraph(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.channels = unet.config.in_channels

    def forward(self, sample, timestep, image_embeds):
        out = self.unet(
            sample,
            timestep.expand(sample.shape[0]),
            encoder_hidden_states=None,
            added_cond_kwargs={"image_embeds": image_embeds},
            return_dict=False,
        )[0]
        # The variance channels (4..8) are unused with a fixed_small scheduler: do not ship them.
        return out[:, : self.channels]


class MoVQGraph(nn.Module):
    def __init__(self, movq):
        super().__init__()
        self.movq = movq

    def forward(self, latents):
        # force_not_quantize: Kandinsky 2.2 decodes the UNet's latents directly (no codebook),
        # and does not apply the config's scaling_factor.
        image = self.movq.decode(latents, force_not_quantize=True, return_dict=False)[0]
        return (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


class ImageEncoderGraph(nn.Module):
    """λ-ECLIPSE: CLIPVisionModelWithProjection on preprocessed pixels -> projected image_embeds
    (not normalised, as the official pipeline feeds them to the prior)."""

    def __init__(self, image_encoder):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, pixel_values):
        return self.image_encoder(pixel_values=pixel_values).image_embeds


class LambdaPriorGraph(nn.Module):
    def __init__(self, prior):
        super().__init__()
        self.prior = prior

    def forward(self, noise, text_embeds, text_hidden_states, attention_mask, control_embeds):
        return self.prior(noise, text_embeds, text_hidden_states, attention_mask.bool(), control_embeds)


GRAPHS: dict[str, type[nn.Module]] = {
    "text_encoder": TextEncoderGraph,
    "prior": PriorGraph,
    "unet": UNetGraph,
    "movq": MoVQGraph,
}

# family -> component -> wrapper
FAMILY_GRAPHS: dict[str, dict[str, type[nn.Module]]] = {
    "kandinsky22": GRAPHS,
    "lambda": {**GRAPHS, "image_encoder": ImageEncoderGraph, "prior": LambdaPriorGraph},
    # Karlo: text encoder and prior wrappers as above (ViT-L/14, 768-d), its decoder chain in karlo_graphs
    "karlo": {"text_encoder": TextEncoderGraph, "prior": PriorGraph, **karlo_graphs.GRAPHS},
}

assert set(GRAPHS) == set(COMPONENTS), "every component spec needs a graph wrapper"
assert all(set(g) == set(get_family(f).components) for f, g in FAMILY_GRAPHS.items())


def _spec(component: str, spec=None, family: str = DEFAULT_FAMILY):
    return spec or get_family(family).components[component]


def wrap(component: str, module: nn.Module, family: str = DEFAULT_FAMILY) -> nn.Module:
    return FAMILY_GRAPHS[family][component](module).eval()


def torch_inputs(component: str, arrays: dict, spec=None, family: str = DEFAULT_FAMILY) -> tuple[torch.Tensor, ...]:
    """Numpy inputs (by name) -> torch tensors in the spec's order."""
    return tuple(torch.from_numpy(arrays[name]) for name in _spec(component, spec, family).input_names)


def run_torch(component: str, graph: nn.Module, arrays: dict, spec=None, family: str = DEFAULT_FAMILY) -> dict:
    """Run a wrapper on numpy inputs; outputs by name as numpy arrays (float32; int32 outputs, e.g.
    Karlo's text_proj mask, stay int32)."""
    with torch.no_grad():
        out = graph(*torch_inputs(component, arrays, spec, family))
    if isinstance(out, torch.Tensor):
        out = (out,)
    return {name: t.detach().numpy() if t.dtype == torch.int32 else t.detach().float().numpy()
            for name, t in zip(_spec(component, spec, family).output_names, out)}
