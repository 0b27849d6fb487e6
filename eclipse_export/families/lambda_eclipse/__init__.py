"""λ-ECLIPSE (arXiv 2402.05195) + Kandinsky 2.2: subject-driven generation. The prompt's keyword
tokens get the CLIP image embeddings of the user's subject images (image encoder) in place of
their text states; an optional edge map (Canny) is embedded by the same encoder as the control
token; the λ prior (one pass) -> UNet loop with classifier-free guidance against the zero-image
embedding -> MoVQ. Driver: runtime/chains/lambda_eclipse.py."""

from eclipse_export.families.chain import Calibration, Family, Stage
from eclipse_export.families.lambda_eclipse.components import COMPONENTS
from eclipse_export.families.lambda_eclipse.presets import ALL_PRESETS

IMAGE_PROCESSOR_FILE = "image_processor/preprocessor_config.json"

FAMILY = Family(
    name="lambda",
    title="λ-ECLIPSE + Kandinsky 2.2",
    components=COMPONENTS,
    chain=(
        Stage("text_encoder", {"input_ids": "tokens.input_ids"}),
        # once per subject image (and once for the edge map, when given)
        Stage("image_encoder", {"pixel_values": "subject.pixel_values"}),
        Stage("prior", {"noise": "noise.prior", "text_embeds": "text_encoder.text_embeds",
                        # the text states with each keyword's positions replaced by its subject's embedding
                        "text_hidden_states": "subjects.text_hidden_states",
                        "attention_mask": "tokens.attention_mask",
                        # the edge map's embedding, or the zero-image embedding without one
                        "control_embeds": "control.image_embeds"}),
        Stage("unet", {"sample": "loop.sample", "timestep": "loop.timestep", "image_embeds": "loop.image_embeds"},
              loop=True),
        Stage("movq", {"latents": "loop.latents"}),
    ),
    dim_names=("T", "D", "E", "C", "S", "R"),
    required_files=("scheduler_config.json", "negative_image_embeds.npy", "tokenizer/tokenizer.json",
                    IMAGE_PROCESSOR_FILE),
    presets=ALL_PRESETS,
    calibration=Calibration(components=("unet",), sampled=("unet",), subjects=True),
)
