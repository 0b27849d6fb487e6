"""λ-ECLIPSE + Kandinsky 2.2 (families/lambda_eclipse): tokenizer -> text encoder; each subject
image (and the edge map) -> image encoder; the keyword positions of the text states replaced by
their subject's embedding (runtime/subjects.py: interleave); λ prior (one pass, control token) ->
the Kandinsky 2.2 UNet loop with classifier-free guidance against the zero-image embedding ->
MoVQ. As the official pipeline: no negative prompt, the control embedding is the zero-image
embedding when no edge map is given, the pooled text_embeds stay text-only."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from eclipse_export.families.lambda_eclipse import IMAGE_PROCESSOR_FILE
from eclipse_export.runtime import guidance
from eclipse_export.runtime.bundle import Bundle, BundleError
from eclipse_export.runtime.chains.kandinsky22 import Kandinsky22Chain
from eclipse_export.runtime.images import to_uint8
from eclipse_export.runtime.noise import Noises
from eclipse_export.runtime.request import Generation, GenerationError, Request
from eclipse_export.runtime.subjects import ImageProcessorConfig, SubjectError, interleave, keyword_ids, preprocess

if TYPE_CHECKING:
    from eclipse_export.runtime.pipeline import Pipeline


class LambdaEclipseChain(Kandinsky22Chain):
    """Tokenizer, scheduler config and zero-image embedding as Kandinsky 2.2's driver, plus the
    image processor config that subject preprocessing follows."""

    def __init__(self, bundle: Bundle):
        super().__init__(bundle)
        try:
            self.image_processor = ImageProcessorConfig.from_json(bundle.json(IMAGE_PROCESSOR_FILE))
        except ValueError as e:
            raise BundleError(f"{bundle.root}: {IMAGE_PROCESSOR_FILE} cannot be used ({e})") from None
        if self.image_processor.crop != (self.dims["R"], self.dims["R"]):
            raise BundleError(f"{bundle.root}: the image processor crops {self.image_processor.crop}, the image "
                              f"encoder takes {self.dims['R']}x{self.dims['R']}")

    def prior_batch(self, req: Request) -> int:
        return req.batch  # no negative prompt: the negative is the zero-image embedding

    def embed(self, pipe: Pipeline, image, timings: dict, key: str) -> np.ndarray:
        """One image -> its (D,) CLIP image embedding (one image per call: any number of subjects
        within the engines' batch range, and a latency per subject)."""
        stage = self.stages["image_encoder"]
        pixels = preprocess(image, self.image_processor)[None]
        t0 = time.perf_counter()
        out = pipe.sessions[stage.component].run({name: pixels for name in stage.inputs})
        timings[key] = time.perf_counter() - t0
        (name,) = self.family.components[stage.component].output_names
        return out[name][0]

    def run(self, pipe: Pipeline, req: Request, noises: Noises | None = None, record: bool = False,
            progress: Callable[[int, int], None] | None = None, warnings: list[str] | None = None) -> Generation:
        if req.negative_prompt is not None:
            raise GenerationError("λ-ECLIPSE takes no negative prompt (as the official pipeline, the negative is the "
                                  "zero-image embedding)")
        if not req.subjects:
            raise GenerationError("this is a λ-ECLIPSE bundle: give at least one subject image with its keyword "
                                  "(--subject dog.png=dog; subjects=[(image, 'dog')]); plain text-to-image needs a "
                                  "plain ECLIPSE bundle")
        warnings = list(warnings or [])
        try:
            ids = [keyword_ids(self.tokenizer, keyword) for _, keyword in req.subjects]
        except SubjectError as e:
            raise GenerationError(str(e)) from None
        sched = self.make_scheduler(req.scheduler)
        try:
            sched.set_timesteps(req.steps)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        if noises is None:
            noises = self.noises_for(req)
        else:
            noises.check(self.prior_batch(req), self.dims["D"], self.latent_shape(req), req.steps, sched.needs_noise)
        timings: dict[str, float] = {}
        inter: dict[str, np.ndarray] = {}
        t_start = time.perf_counter()

        # 1. tokens, 2. text encoder
        tokens = self.tokenizer(list(req.prompts))
        for text, cut in zip(req.prompts, tokens.truncated):
            if cut:
                warnings.append(f"prompt truncated to {self.tokenizer.max_length} tokens: {text[:60]!r}...")
        values = {"tokens.input_ids": tokens.input_ids, "tokens.attention_mask": tokens.attention_mask,
                  "noise.prior": noises.prior}
        self._call(pipe, self.stages["text_encoder"], values, timings)

        # 3. image encoder: each subject, then the edge map (else the zero-image embedding)
        subject_embeds = [self.embed(pipe, image, timings, f"image_encoder.subject{i}")
                          for i, (image, _) in enumerate(req.subjects)]
        if req.control is not None:
            control = self.embed(pipe, req.control, timings, "image_encoder.control")
        else:
            control = self.negative_image_embeds[0]
        timings["image_encoder"] = sum(v for k, v in timings.items() if k.startswith("image_encoder."))
        pipe.stage_done("image_encoder")

        # 4. interleave: the keyword's positions take the subject's embedding
        hidden, found = interleave(tokens.input_ids, values["text_encoder.text_hidden_states"],
                                   list(zip(ids, subject_embeds)))
        for b, row in enumerate(found):
            for (_, keyword), hit in zip(req.subjects, row):
                if not hit:
                    where = f" (prompt {b + 1})" if req.batch > 1 else ""
                    warnings.append(f"the subject keyword {keyword!r} is not in the prompt{where}: its image is unused")
        values["subjects.text_hidden_states"] = hidden
        values["control.image_embeds"] = np.repeat(control[None], req.batch, axis=0).astype(np.float32)

        # 5. λ prior, 6. UNet loop against the zero-image embedding, 7. MoVQ
        self._call(pipe, self.stages["prior"], values, timings)
        image_embeds = values["prior.image_embeds"]
        negative_embeds = np.repeat(self.negative_image_embeds, req.batch, axis=0)
        values["loop.image_embeds"] = (np.concatenate([negative_embeds, image_embeds])
                                       if guidance.cfg_enabled(req.guidance_scale) else image_embeds)
        image = self.denoise_and_decode(pipe, req, sched, noises, values, timings, inter, record, progress, warnings)
        timings["total"] = time.perf_counter() - t_start

        if record:
            inter.update({
                "text_encoder.text_embeds": values["text_encoder.text_embeds"],
                "text_encoder.text_hidden_states": values["text_encoder.text_hidden_states"],
                **{f"image_encoder.subject{i}": e[None] for i, e in enumerate(subject_embeds)},
                "image_encoder.control": control[None],
                "prior.text_hidden_states": hidden,
                "prior.image_embeds": image_embeds,
                "prior.negative_image_embeds": negative_embeds,
                "unet.latents": values["loop.latents"],
                "movq.image": image,
            })
        return Generation(to_uint8(image), req, noises, timings, warnings, inter)
