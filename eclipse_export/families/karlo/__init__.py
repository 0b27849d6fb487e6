"""ECLIPSE + Karlo (unCLIP): CLIP ViT-L/14 text encoder -> ECLIPSE prior (one pass) -> text_proj
(decoder context + time embedding) -> 64 px decoder loop (guidance on the noise channels, learned
variance) -> bicubic 64 -> 256 upsample -> super-resolution loop (first UNet, then the last for
the final step) -> image. Driver: runtime/chains/karlo.py."""

from eclipse_export.families.chain import Calibration, Family, Stage
from eclipse_export.families.karlo.components import COMPONENTS
from eclipse_export.families.karlo.presets import ALL_PRESETS

FAMILY = Family(
    name="karlo",
    title="ECLIPSE + Karlo (unCLIP)",
    components=COMPONENTS,
    chain=(
        Stage("text_encoder", {"input_ids": "tokens.input_ids"}),
        Stage("prior", {"noise": "noise.prior", "text_embeds": "text_encoder.text_embeds",
                        "text_hidden_states": "text_encoder.text_hidden_states",
                        "attention_mask": "tokens.attention_mask"}),
        # the guidance batch ["", prompt]: the text encoder runs again on it (see the driver)
        Stage("text_proj", {"image_embeds": "cfg.image_embeds", "unconditional": "cfg.unconditional",
                            "text_embeds": "cfg.text_embeds", "text_hidden_states": "cfg.text_hidden_states",
                            "attention_mask": "cfg.attention_mask"}),
        Stage("decoder", {"sample": "loop.sample", "timestep": "loop.timestep",
                          "encoder_hidden_states": "text_proj.encoder_hidden_states",
                          "class_labels": "text_proj.class_labels",
                          "attention_mask": "text_proj.decoder_attention_mask"}, loop=True),
        Stage("super_res_first", {"sample": "sr.sample", "image_upscaled": "sr.image_upscaled",
                                  "timestep": "sr.timestep"}),
        Stage("super_res_last", {"sample": "sr.sample", "image_upscaled": "sr.image_upscaled",
                                 "timestep": "sr.timestep"}),
    ),
    dim_names=("T", "D", "E", "X", "L", "K", "M", "P", "Q"),
    required_files=("decoder_scheduler_config.json", "super_res_scheduler_config.json", "tokenizer/tokenizer.json"),
    presets=ALL_PRESETS,
    default_size=(256, 256),
    # the three UNets are where the time goes; super_res_last runs once per image (recorded whole),
    # the decoder and super_res_first at a few of their calls per prompt
    calibration=Calibration(components=("decoder", "super_res_first", "super_res_last"),
                            sampled=("decoder", "super_res_first")),
    # the super-resolution loop runs both UNets (timed together); the upsample is host work
    timed=("text_encoder", "prior", "text_proj", "decoder", "upsample", "super_res"),
)
