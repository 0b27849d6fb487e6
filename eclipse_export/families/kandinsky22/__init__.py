"""ECLIPSE + Kandinsky 2.2: CLIP ViT-bigG/14 text encoder -> ECLIPSE prior (one pass) -> UNet loop
with classifier-free guidance -> MoVQ decoder. Driver: runtime/chains/kandinsky22.py."""

from eclipse_export.families.chain import Calibration, Family, Stage
from eclipse_export.families.kandinsky22.components import COMPONENTS
from eclipse_export.families.kandinsky22.presets import ALL_PRESETS

FAMILY = Family(
    name="kandinsky22",
    title="ECLIPSE + Kandinsky 2.2",
    components=COMPONENTS,
    chain=(
        Stage("text_encoder", {"input_ids": "tokens.input_ids"}),
        Stage("prior", {"noise": "noise.prior", "text_embeds": "text_encoder.text_embeds",
                        "text_hidden_states": "text_encoder.text_hidden_states",
                        "attention_mask": "tokens.attention_mask"}),
        # image_embeds: [negative; positive] under classifier-free guidance (see runtime/guidance.py)
        Stage("unet", {"sample": "loop.sample", "timestep": "loop.timestep", "image_embeds": "loop.image_embeds"},
              loop=True),
        Stage("movq", {"latents": "loop.latents"}),
    ),
    dim_names=("T", "D", "E", "C", "S"),
    required_files=("scheduler_config.json", "negative_image_embeds.npy", "tokenizer/tokenizer.json"),
    presets=ALL_PRESETS,
    calibration=Calibration(components=("unet",), sampled=("unet",)),
)
