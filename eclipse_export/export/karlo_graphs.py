"""The Karlo (unCLIP) graphs: thin torch wrappers over diffusers' modules, one per component
spec of families/karlo (inputs in the spec's order, outputs in its order). The text encoder and
prior wrappers are Kandinsky's (export/graphs.py): same I/O, other widths."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TextProjGraph(nn.Module):
    """UnCLIPTextProjModel row by row. diffusers' pipeline prepends the learned unconditional
    embedding to the image embeddings under guidance (batch [uncond; cond]); here each row says
    whether it is unconditional, so one graph serves guided and unguided batches and its output
    rows are exactly the pipeline's. The text mask is left-padded by the extra context tokens,
    as the pipeline pads it for the decoder."""

    def __init__(self, text_proj):
        super().__init__()
        self.text_proj = text_proj
        self.extra = int(text_proj.clip_extra_context_tokens)

    def forward(self, image_embeds, unconditional, text_embeds, text_hidden_states, attention_mask):
        learned = self.text_proj.learned_classifier_free_guidance_embeddings.unsqueeze(0).expand_as(image_embeds)
        rows = torch.where(unconditional.bool().unsqueeze(1), learned, image_embeds)
        hidden, time_embeds = self.text_proj(image_embeddings=rows, prompt_embeds=text_embeds,
                                             text_encoder_hidden_states=text_hidden_states,
                                             do_classifier_free_guidance=False)
        mask = F.pad(attention_mask, (self.extra, 0), value=1)
        return hidden, time_embeds, mask


class DecoderGraph(nn.Module):
    """The 64 px decoder UNet with all 6 output channels (the scheduler needs the variance).
    The mask goes in as the pipeline gives it (bool); diffusers turns it into an additive bias
    and, at each SimpleCrossAttn level, pads it with one zero per image token for the added-KV
    attention: a constant-size pad, since the decoder's size is static."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, class_labels, attention_mask):
        return self.unet(sample, timestep.expand(sample.shape[0]), encoder_hidden_states=encoder_hidden_states,
                         class_labels=class_labels, attention_mask=attention_mask.bool(), return_dict=False)[0]


class SuperResGraph(nn.Module):
    """A super-resolution UNet2DModel: its input is the noisy image concatenated with the
    upsampled decoder image (6 channels), done here so the host never builds the 6-channel copy."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, image_upscaled, timestep):
        x = torch.cat([sample, image_upscaled], dim=1)
        return self.unet(x, timestep.expand(sample.shape[0]), return_dict=False)[0]


GRAPHS = {"text_proj": TextProjGraph, "decoder": DecoderGraph, "super_res_first": SuperResGraph,
          "super_res_last": SuperResGraph}
