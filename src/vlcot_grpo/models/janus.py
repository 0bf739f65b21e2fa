"""Janus / Janus-Pro backend: image codes with their own input embedding and output head, shown as one vocabulary.

transformers' ``JanusForConditionalGeneration`` (DeepSeek's Janus-1.3B, Janus-Pro-1B and -7B) gives its language
model two tables: text tokens go through ``embed_tokens`` and ``lm_head``; image codes (LlamaGen VQ-16, 16384 codes)
through ``generation_embeddings`` + ``generation_aligner`` in and ``generation_head`` out. Its ``generate`` switches
between the two by a ``generation_mode`` argument, so it writes text or one image, never both in one sequence.

A VLCoT chain interleaves both, and every part of this project (the rollout engines, the guided log-probs, the
trainer, the rewards) works on one vocabulary in which an image code is a token id. So this family is presented
as one: text ids first, then code c at id ``text_rows + c``, where ``text_rows`` is the text table's size
(``config.text_config.vocab_size``). ``JanusForVLCoT`` does this with no new weights:

* input: an id below ``text_rows`` is looked up in the text table, any other id in the image table and aligner;
* output: the logits are the text head's and the image head's side by side (``text_rows + 16384`` columns).

Why one vocabulary rather than a second code path in the engines: the engines, the CUDA graphs, the KV caches and
the log-probs then need no family test, and the model keeps transformers' parameter names, so checkpoints, PEFT
adapters and ZeRO-3 partitions are those of ``JanusForConditionalGeneration`` (an adapter trained here loads onto
the stock class). The cost: both tables are read at every position (the aligner's small MLP included) and merged
with a select, which keeps the shapes static for CUDA graphs.

Layout of one image, as Janus writes one (``JanusProcessor``: image start, codes, image end)::

    <begin_of_image> (code x cols) x rows <end_of_image>

Janus has no size or end-of-row token, so an image does not say its grid: the engine forces the stage's grid (as for
every family, the template comes from the stage), and parsing takes the grid it expects (``announces_grid``).
The low-quality prompt image also enters as VQ codes through the image table; the understanding encoder (SigLIP,
``vision_model``) is not used and stays frozen.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from transformers import JanusForConditionalGeneration
from transformers.models.janus.modeling_janus import (
    JanusCausalLMOutputWithPast,
    JanusModel,
    JanusPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple

from vlcot_grpo.models.base import ImageTokenBackend, unwrap_model
from vlcot_grpo.models.llamagen import decode_codes, encode_to_codes

IMAGE_START = "<begin_of_image>"
IMAGE_END = "<end_of_image>"
LAYOUT_TOKENS = (IMAGE_START, IMAGE_END)


class JanusJointModel(JanusModel):
    """``JanusModel`` whose ``input_ids`` may hold image codes (ids from ``text_rows`` on)."""

    def embed_joint(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of mixed text and code ids: text rows from the text table, codes through the image table and
        aligner. Both are computed at every position and merged by a select: no data-dependent shapes."""
        text_rows = self.config.text_config.vocab_size
        is_code = (input_ids >= text_rows)[..., None]
        text = self.get_input_embeddings()(input_ids.clamp(max=text_rows - 1))
        codes = self.generation_aligner(self.generation_embeddings((input_ids - text_rows).clamp(min=0)))
        return torch.where(is_code, codes.to(text.dtype), text)

    def forward(self, input_ids=None, pixel_values=None, inputs_embeds=None, **kwargs):
        if input_ids is not None and inputs_embeds is None and pixel_values is None:
            input_ids, inputs_embeds = None, self.embed_joint(input_ids)
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, inputs_embeds=inputs_embeds, **kwargs)


class JoinLogits(torch.nn.Module):
    """Text logits then image-code logits along the last dimension. A module of its own, with no weights, so that
    a forward hook on the logits over the whole vocabulary (``ImageTokenBackend.logits_module``) has somewhere to
    attach, as the output head is in the other families."""

    def forward(self, text_logits: torch.Tensor, code_logits: torch.Tensor) -> torch.Tensor:
        return torch.cat([text_logits, code_logits.to(text_logits.dtype)], dim=-1)


class JanusForVLCoT(JanusForConditionalGeneration):
    """``JanusForConditionalGeneration`` over one vocabulary of text ids and image codes (module docstring).

    Same modules, names and config as the stock class (``model_type: janus``): it loads any Janus checkpoint and
    saves one the stock class loads. ``generate(generation_mode="image")`` is the stock one, left as it is.
    """

    def __init__(self, config):
        # the stock __init__ would build a JanusModel first; build the joint one in its place
        JanusPreTrainedModel.__init__(self, config)
        self.model = JanusJointModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.join_logits = JoinLogits()
        self.post_init()

    def joint_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Text logits then image-code logits, ``(..., text_rows + codebook)``."""
        return self.join_logits(self.lm_head(hidden_states), self.model.generation_head(hidden_states))

    @can_return_tuple
    def forward(
        self, input_ids=None, labels=None, logits_to_keep: int | torch.Tensor = 0, **kwargs
    ) -> JanusCausalLMOutputWithPast:
        """The stock forward's inputs (``attention_mask``, ``position_ids``, ``cache``, ``pixel_values``...) go to
        the joint model as they are; the logits cover text and image codes."""
        outputs = self.model(input_ids=input_ids, **kwargs)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.joint_logits(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return JanusCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )


class JanusBackend(ImageTokenBackend):
    name = "janus"
    model_class = JanusForVLCoT
    #: the language model's projections only: the understanding encoder (SigLIP) has q/k/v projections too
    lora_target_modules = (
        r"(.*\.)?model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    )
    #: None: the tags are added as new tokens. Janus-Pro's text table (102400 rows) is larger than its tokenizer
    #: (100015 ids), so the tags take unused rows and nothing is resized.
    reserved_tag_tokens = None
    #: the VQ model, the image table, aligner and head (this family's image path), and the text head (tag rows)
    full_precision_modules = (
        "model.vqmodel",
        "model.generation_embeddings",
        "model.generation_aligner",
        "model.generation_head",
        "lm_head",
    )
    announces_grid = False
    layout_tokens = LAYOUT_TOKENS
    #: two heads (text, image): TRL's fused LM head, which projects through ``get_output_embeddings`` alone, cannot
    #: score this family (``vlcot_grpo.sft`` scores its SFT loss from the model's own logits)
    single_output_layer = False

    def frozen_modules(self) -> list[torch.nn.Module]:
        # the understanding encoder and its aligner: the VLCoT path reads images as codes
        janus = unwrap_model(self.model).model
        return [*super().frozen_modules(), janus.vision_model, janus.aligner]

    @property
    def logits_module(self) -> torch.nn.Module:
        return unwrap_model(self.model).join_logits

    @property
    def text_rows(self) -> int:
        """Rows of the text table: the first code's id."""
        return int(unwrap_model(self.model).config.text_config.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.text_rows + int(self.vqmodel.config.num_embeddings)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vqmodel.config.channel_multiplier) - 1)

    @cached_property
    def code_token_ids(self) -> torch.Tensor:
        return torch.arange(self.text_rows, self.vocab_size, dtype=torch.long)

    @cached_property
    def text_token_mask(self) -> torch.Tensor:
        mask = super().text_token_mask.clone()
        # rows of the text table beyond the tokenizer (padding of the published table) are no token at all
        mask[len(self.tokenizer) : self.text_rows] = False
        return mask

    def image_prefix(self, rows: int, cols: int) -> list[int]:
        return [self._ids[IMAGE_START]]

    def row_end(self) -> list[int]:
        return []

    def image_suffix(self) -> list[int]:
        return [self._ids[IMAGE_END]]

    def read_grid(self, ids: list[int]) -> tuple[int, int] | str:
        """With no expected grid: the square grid of the codes between image start and end (Janus's own images are
        square); anything else cannot be read."""
        if not ids:
            return "empty image: no tokens"
        if ids[0] != self._ids[IMAGE_START]:
            return f"token 0 (image header): expected {IMAGE_START!r}, got {self._token_name(ids[0])}"
        codes = len(ids) - 2
        side = math.isqrt(max(codes, 0))
        if codes <= 0 or side * side != codes or ids[-1] != self._ids[IMAGE_END]:
            return (
                f"a Janus image carries no size tokens and these {len(ids)} tokens are not a square grid between "
                f"{IMAGE_START!r} and {IMAGE_END!r}: pass the grid it should have"
            )
        return side, side

    def _token_name(self, token_id: int) -> str:
        if self.text_rows <= token_id < self.vocab_size:
            return f"image code {token_id - self.text_rows} (id {token_id})"
        if len(self.tokenizer) <= token_id < self.text_rows:
            return f"unused text row {token_id}"
        return super()._token_name(token_id)

    def decode_text(self, ids) -> str:
        ids = [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
        return self.tokenizer.decode([i for i in ids if 0 <= i < len(self.tokenizer)], skip_special_tokens=False)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_to_codes(self.vqmodel, pixels)

    def _decode_grids(self, codes: torch.Tensor) -> torch.Tensor:
        return decode_codes(self.vqmodel, codes)
