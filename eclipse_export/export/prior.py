"""The ECLIPSE prior: a diffusers-style PriorTransformer without time conditioning.

ECLIPSE (arXiv 2312.04655) trains a non-diffusion prior: one forward pass maps the CLIP text
embedding (plus a Gaussian noise vector in the `hidden_states` slot) to a CLIP image embedding.
Stock diffusers `PriorTransformer` cannot load the published checkpoint: the checkpoint has no
time_proj/time_embedding weights and the token sequence is 80 long (77 text tokens +
proj_embedding + hidden_states + prd), not 81. This module keeps diffusers' parameter names so
that the published `ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior` safetensors load strictly.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# Additive mask value used by the original implementation; kept as-is (not -inf) so that the
# exported graph computes exactly what the checkpoint was trained with.
MASK_VALUE = -10000.0


class EclipsePrior(ModelMixin, ConfigMixin):
    """Time-free PriorTransformer (state-dict keys = diffusers' minus the time embedding)."""

    CONTROL = False  # LambdaEclipsePrior: one more token, the control embedding

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 32,
        num_layers: int = 10,
        embedding_dim: int = 1280,
        num_embeddings: int = 77,
        additional_embeddings: int = 3,
        dropout: float = 0.0,
        norm_in_type: str | None = None,
        embedding_proj_norm_type: str | None = None,
        encoder_hid_proj_type: str | None = "linear",
        added_emb_type: str | None = "prd",
        embedding_proj_dim: int | None = None,
        clip_embed_dim: int | None = None,
    ):
        super().__init__()
        # The export path depends on this exact structure; fail loudly on variants we never saw.
        if norm_in_type is not None or embedding_proj_norm_type is not None:
            raise ValueError("EclipsePrior: norm_in_type/embedding_proj_norm_type are not used by ECLIPSE")
        if encoder_hid_proj_type != "linear" or added_emb_type != "prd":
            raise ValueError("EclipsePrior expects encoder_hid_proj_type='linear' and added_emb_type='prd'")
        if additional_embeddings != 3 + self.CONTROL:
            raise ValueError(f"{type(self).__name__} expects additional_embeddings={3 + self.CONTROL} "
                             f"({'control, ' if self.CONTROL else ''}proj_embedding, hidden_states, prd)")
        inner_dim = num_attention_heads * attention_head_dim
        embedding_proj_dim = embedding_proj_dim or embedding_dim
        clip_embed_dim = clip_embed_dim or embedding_dim
        seq_len = num_embeddings + additional_embeddings

        self.proj_in = nn.Linear(embedding_dim, inner_dim)
        self.embedding_proj = nn.Linear(embedding_proj_dim, inner_dim)
        if self.CONTROL:  # λ-ECLIPSE: the edge map's (or the zero image's) CLIP embedding
            self.embedding_control = nn.Linear(embedding_proj_dim, inner_dim)
        self.encoder_hidden_states_proj = nn.Linear(embedding_dim, inner_dim)
        self.positional_embedding = nn.Parameter(torch.zeros(1, seq_len, inner_dim))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner_dim))
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    dropout=dropout,
                    activation_fn="gelu",
                    attention_bias=True,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = nn.LayerNorm(inner_dim)
        self.proj_to_clip_embeddings = nn.Linear(inner_dim, clip_embed_dim)
        causal = torch.full((seq_len, seq_len), MASK_VALUE).triu_(1)[None]
        self.register_buffer("causal_attention_mask", causal, persistent=False)
        # Present in the checkpoint, never applied: ECLIPSE does not un-normalise its output.
        self.clip_mean = nn.Parameter(torch.zeros(1, clip_embed_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, clip_embed_dim))

    def forward(
        self,
        hidden_states: torch.Tensor,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """hidden_states: noise (B,D); proj_embedding: text_embeds (B,D);
        encoder_hidden_states: last_hidden_state (B,77,D); attention_mask: (B,77) bool/int.
        Returns the predicted CLIP image embedding (B, clip_embed_dim)."""
        return self._predict([
            self.encoder_hidden_states_proj(encoder_hidden_states),
            self.embedding_proj(proj_embedding)[:, None, :],
            self.proj_in(hidden_states)[:, None, :],
        ], attention_mask)

    def _predict(self, parts: list[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        """parts: the projected tokens before prd, in order; returns the last token's projection."""
        batch = parts[0].shape[0]
        tokens = torch.cat([*parts, self.prd_embedding.to(parts[0].dtype).expand(batch, -1, -1)], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)

        # the text mask, padded with the additional tokens as kept (0 in the additive mask)
        mask = (1 - attention_mask.to(tokens.dtype)) * MASK_VALUE
        mask = nn.functional.pad(mask, (0, self.config.additional_embeddings), value=0.0)
        mask = (mask[:, None, :] + self.causal_attention_mask).to(tokens.dtype)
        # diffusers' attention processors take a (B*heads, L, L) additive mask.
        mask = mask.repeat_interleave(self.config.num_attention_heads, dim=0)

        for block in self.transformer_blocks:
            tokens = block(tokens, attention_mask=mask)
        tokens = self.norm_out(tokens)
        return self.proj_to_clip_embeddings(tokens[:, -1])


class LambdaEclipsePrior(EclipsePrior):
    """The λ-ECLIPSE prior (arXiv 2402.05195): ECLIPSE plus a control token. 81 tokens: 77
    projected text states (subject image embeddings already interleaved by the caller), the
    projected control embedding (`embedding_control`, as the published checkpoint names it),
    the projected text_embeds, the projected noise, prd. Same mask rule: the tokenizer mask
    padded with the 4 extra tokens kept, plus causal."""

    CONTROL = True

    def forward(self, hidden_states, proj_embedding, encoder_hidden_states, attention_mask,
                control_embedding):  # noqa: D401 - same arguments as EclipsePrior + control
        return self._predict([
            self.encoder_hidden_states_proj(encoder_hidden_states),
            self.embedding_control(control_embedding)[:, None, :],
            self.embedding_proj(proj_embedding)[:, None, :],
            self.proj_in(hidden_states)[:, None, :],
        ], attention_mask)


def expected_state_dict_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of every key the published checkpoint has, derived from its config alone.

    Written independently of the module (from diffusers' PriorTransformer naming) so that the
    strict-load test proves the module matches the checkpoint layout rather than itself.
    """
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    inner, emb = heads * head_dim, config["embedding_dim"]
    seq = config["num_embeddings"] + config["additional_embeddings"]
    clip = config.get("clip_embed_dim") or emb
    shapes: dict[str, tuple[int, ...]] = {
        "proj_in.weight": (inner, emb),
        "proj_in.bias": (inner,),
        "embedding_proj.weight": (inner, config.get("embedding_proj_dim") or emb),
        "embedding_proj.bias": (inner,),
        **({"embedding_control.weight": (inner, config.get("embedding_proj_dim") or emb),
            "embedding_control.bias": (inner,)} if config["additional_embeddings"] == 4 else {}),
        "encoder_hidden_states_proj.weight": (inner, emb),
        "encoder_hidden_states_proj.bias": (inner,),
        "positional_embedding": (1, seq, inner),
        "prd_embedding": (1, 1, inner),
        "norm_out.weight": (inner,),
        "norm_out.bias": (inner,),
        "proj_to_clip_embeddings.weight": (clip, inner),
        "proj_to_clip_embeddings.bias": (clip,),
        "clip_mean": (1, clip),
        "clip_std": (1, clip),
    }
    for i in range(config["num_layers"]):
        p = f"transformer_blocks.{i}."
        for norm in ("norm1", "norm3"):
            shapes[p + norm + ".weight"] = (inner,)
            shapes[p + norm + ".bias"] = (inner,)
        for proj in ("to_q", "to_k", "to_v"):
            shapes[p + f"attn1.{proj}.weight"] = (inner, inner)
            shapes[p + f"attn1.{proj}.bias"] = (inner,)
        shapes[p + "attn1.to_out.0.weight"] = (inner, inner)
        shapes[p + "attn1.to_out.0.bias"] = (inner,)
        shapes[p + "ff.net.0.proj.weight"] = (4 * inner, inner)
        shapes[p + "ff.net.0.proj.bias"] = (4 * inner,)
        shapes[p + "ff.net.2.weight"] = (inner, 4 * inner)
        shapes[p + "ff.net.2.bias"] = (inner,)
    return shapes
