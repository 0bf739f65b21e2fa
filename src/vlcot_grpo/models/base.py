"""The model-backend interface: everything the rollout engine, the trainer and the rewards need to know about a
unified model family, and nothing more.

A backend wraps one loaded model and its tokenizer and answers four questions:

1. pixels <-> VQ codes: ``encode_images`` / ``decode_codes`` (a code grid is a ``(rows, cols)`` LongTensor);
2. codes <-> language-model token ids in the family's image layout: ``image_template`` gives the whole layout of an
   image of a given grid with ``-1`` wherever a code is sampled, every other position being a forced layout token;
   ``codes_to_token_ids`` fills it in; ``parse_image_tokens`` is the inverse and never raises on bad input;
3. which vocabulary entries are image codes (``image_code_mask``) and which are layout-only (``layout_token_ids``);
4. the VLCoT tags as token ids (``tag_ids``).

Families differ only in how an image is framed (``image_prefix``, ``row_end``, ``image_suffix``, ``read_grid``)
and in their VQ model (``_encode_pixels``, ``_decode_grids``). Everything else lives here, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image

from vlcot_grpo.vlcot import TAGS

CODE = -1  # marks a sampled (not forced) position in an image template


@contextmanager
def without_zero3_init():
    """Build or load a model with full tensors even inside a ZeRO-3 run.

    ``accelerate launch`` with ZeRO-3 sets transformers' global DeepSpeed config, under which models are partitioned
    as they are constructed. Two things break there: a freshly built model would be saved empty, and Emu3's VQ
    weight init (transformers 5.24) cannot run on partitioned tensors. DeepSpeed still partitions the model when the
    trainer wraps it, so training memory is unchanged; only loading holds one full copy per process in CPU memory.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def unwrap_model(model):
    """The transformers model under PEFT / DeepSpeed / DDP wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


@dataclass
class ImageParse:
    """Result of parsing the token ids of one image. ``codes`` is set only when ``error`` is None."""

    codes: torch.Tensor | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def grid(self) -> tuple[int, int] | None:
        return None if self.codes is None else (int(self.codes.shape[0]), int(self.codes.shape[1]))


class ImageTokenBackend(ABC):
    """One model family's image tokenisation and layout. Subclasses implement the abstract methods below."""

    #: Short name of the family.
    name: str = ""
    #: transformers class that loads a checkpoint of this family.
    model_class: type = None
    #: PEFT ``target_modules`` (regex) for LoRA on the language model only.
    lora_target_modules: str | list[str] | None = None
    #: Tokens the family reserves and no code uses, which ``vlcot-grpo prepare`` re-purposes as the 14 VLCoT tags (in
    #: ``TAGS`` order; same ids, no resize). None: the tags are added as new tokens and the embeddings resized.
    reserved_tag_tokens: tuple[str, ...] | None = None
    #: Modules (full names from the model's root) left unquantized under QLoRA: what must stay exact (a VQ model)
    #: and the output head, whose tag rows are trained.
    full_precision_modules: tuple[str, ...] = ()
    #: The family's named layout tokens (image start/end, end of row...): ``_ids`` maps each to its id.
    layout_tokens: tuple[str, ...] = ()

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    # ----- family specifics -------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def downsample(self) -> int:
        """Pixels per code along each side."""

    @property
    @abstractmethod
    def code_token_ids(self) -> torch.Tensor:
        """LongTensor ``(codebook_size,)``: the language-model token id of each VQ code."""

    @abstractmethod
    def image_prefix(self, rows: int, cols: int) -> list[int]:
        """Forced token ids before the first code (image start, size tokens, ...)."""

    @abstractmethod
    def row_end(self) -> list[int]:
        """Forced token ids after each row of codes (may be empty)."""

    @abstractmethod
    def image_suffix(self) -> list[int]:
        """Forced token ids after the last row (image end, ...)."""

    @abstractmethod
    def read_grid(self, ids: list[int]) -> tuple[int, int] | str:
        """Grid size announced by the prefix of ``ids``, or an error message."""

    @abstractmethod
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` floats in [-1, 1] -> ``(B, rows, cols)`` codes."""

    @abstractmethod
    def _decode_grids(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, rows, cols)`` codes -> ``(B, 3, H, W)`` floats in [-1, 1]."""

    # ----- vocabulary -------------------------------------------------------------------------------------------
    @property
    def logits_module(self) -> torch.nn.Module:
        """The module whose output is the logits over the whole vocabulary, where a forward hook on them attaches:
        the output head, or Janus's join of its two heads."""

        return unwrap_model(self.model).get_output_embeddings()

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self.code_token_ids.numel())

    @cached_property
    def image_code_mask(self) -> torch.Tensor:
        """BoolTensor ``(vocab_size,)``: True at the token ids of image codes."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self.code_token_ids] = True
        return mask

    @cached_property
    def token_to_code(self) -> torch.Tensor:
        """LongTensor ``(vocab_size,)``: code index of each token id, -1 for non-code tokens."""
        table = torch.full((self.vocab_size,), -1, dtype=torch.long)
        table[self.code_token_ids] = torch.arange(self.codebook_size)
        return table

    #: The smallest code grid the family's layout can announce (PURE counts sides in 4-code units).
    smallest_grid: tuple[int, int] = (1, 1)
    #: Whether an image's layout says its grid (size tokens, end-of-row tokens). Janus's does not: an image is then
    #: parsed against the grid expected of it, and ``read_grid`` is asked only when none is given.
    announces_grid: bool = True
    #: Whether the logits over the whole vocabulary are one linear layer (``get_output_embeddings``), as TRL's fused
    #: LM head assumes. Janus's are two heads side by side.
    single_output_layer: bool = True

    @cached_property
    def layout_token_ids(self) -> list[int]:
        """Tokens that only ever appear as forced image layout (never sampled as text)."""
        template = self.image_template(*self.smallest_grid).tolist()
        ids = set(template) - {CODE}
        # Size tokens may be ordinary text (Emu3 writes "16*16"): keep those sampleable as text.
        ids -= set(self._size_token_ids(1, 1))
        return sorted(ids)

    @cached_property
    def text_token_mask(self) -> torch.Tensor:
        """BoolTensor ``(vocab_size,)``: what free text may sample: no image codes, layout or special tokens but EOS/tags."""
        mask = ~self.image_code_mask
        mask[self.layout_token_ids] = False
        # Special tokens (pad, bos, unk, placeholders, a real checkpoint's reserved tokens such as Emu3's
        # <|extra_N|>, ...) are never written as text; EOS and the tags are.
        keep = set(self.tag_ids.values()) | ({self.eos_token_id} - {None})
        special = set(self.tokenizer.all_special_ids)
        special |= {int(i) for i, token in self.tokenizer.added_tokens_decoder.items() if token.special}
        mask[sorted(i for i in special if i not in keep and i < self.vocab_size)] = False
        return mask

    @cached_property
    def tag_ids(self) -> dict[str, int]:
        """The 14 VLCoT tags (``"<rough_image>"``, ...) as token ids; each must be a single token."""
        ids = {}
        for tag in TAGS:
            tok = self.tokenizer.convert_tokens_to_ids(tag)
            if tok is None or tok == self.tokenizer.unk_token_id:
                raise ValueError(
                    f"the tokenizer has no single token for the VLCoT tag {tag!r}: prepare the checkpoint once with "
                    "`vlcot-grpo prepare --model SRC --out DST` (vlcot_grpo.models.prepare_checkpoint, or "
                    "vlcot_grpo.models.add_vlcot_tokens on a loaded model) and train from DST"
                )
            ids[tag] = int(tok)
        return ids

    def _size_token_ids(self, rows: int, cols: int) -> list[int]:
        return []

    @cached_property
    def _ids(self) -> dict[str, int]:
        return self._named_token_ids(self.layout_tokens)

    @property
    def vqmodel(self):
        """The image tokenizer; ``model.vqmodel`` of the unwrapped model unless the family keeps it elsewhere."""
        return unwrap_model(self.model).model.vqmodel

    def _named_token_ids(self, tokens) -> dict[str, int]:
        """token -> id for each of the family's named layout tokens; a ValueError names one the tokenizer lacks."""
        ids = {}
        for tok in tokens:
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == self.tokenizer.unk_token_id:
                raise ValueError(f"{self.name} tokenizer lacks the layout token {tok!r}")
            ids[tok] = int(tid)
        return ids

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules no loss reaches (the VQ model, which only defines targets and pictures): the trainers freeze them,
        so that optimisers that step every parameter (DeepSpeed: zero gradients + weight decay) cannot change them."""
        vq = getattr(self, "vqmodel", None)
        return [] if vq is None else [vq]

    # ----- sizes ------------------------------------------------------------------------------------------------
    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Code grid of an image of ``height`` x ``width`` pixels; both must be multiples of ``downsample``."""
        if height <= 0 or width <= 0 or height % self.downsample or width % self.downsample:
            raise ValueError(
                f"image size {height}x{width} is not a positive multiple of this model's downsample factor "
                f"{self.downsample} (backend {self.name!r})"
            )
        return height // self.downsample, width // self.downsample

    # ----- pixels <-> codes -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
        """Resize each image to ``size`` = (height, width), encode it, return ``(B, rows, cols)`` codes."""
        height, width = size
        self.grid_for(height, width)
        arrays = [
            np.asarray(img.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
            for img in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        return self._encode_pixels(pixels).long().cpu()

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> list[Image.Image]:
        """``(B, rows, cols)`` or ``(rows, cols)`` codes -> list of RGB PIL images of ``downsample`` times the grid."""
        if codes.ndim == 2:
            codes = codes[None]
        pixels = self._decode_grids(codes.long())
        arrays = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a, "RGB") for a in arrays]

    # ----- codes <-> token ids ----------------------------------------------------------------------------------
    def image_template(self, rows: int, cols: int) -> torch.Tensor:
        """The full token layout of a ``rows`` x ``cols`` image: forced ids, and ``CODE`` (-1) where codes go."""
        row = [CODE] * cols + self.row_end()
        return torch.tensor(self.image_prefix(rows, cols) + row * rows + self.image_suffix(), dtype=torch.long)

    def codes_to_token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """``(rows, cols)`` code grid -> flat token ids in this family's layout."""
        rows, cols = codes.shape
        template = self.image_template(rows, cols)
        ids = template.clone()
        ids[template == CODE] = self.code_token_ids[codes.reshape(-1).cpu()]
        return ids

    def parse_image_tokens(self, ids, expected_grid: tuple[int, int] | None = None) -> ImageParse:
        """Token ids of one image (layout included) -> its code grid, or an error saying what is wrong.

        With ``expected_grid`` the size tokens must announce exactly that grid; without it the grid is read from them.
        """
        ids = [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
        if expected_grid is not None and not self.announces_grid:
            grid = tuple(expected_grid)
        else:
            grid = self.read_grid(ids)
        if isinstance(grid, str):
            return ImageParse(error=grid)
        if expected_grid is not None and tuple(grid) != tuple(expected_grid):
            return ImageParse(
                error=f"size tokens announce a {grid[0]}x{grid[1]} grid, expected {expected_grid[0]}x{expected_grid[1]}"
            )
        rows, cols = grid
        if rows * (cols + len(self.row_end())) > len(ids):  # checked before the template is built: an absurd
            # header (99999999*99999999) must not allocate it
            return ImageParse(
                error=f"truncated image: {'size tokens announce' if self.announces_grid else 'the stage expects'} "
                f"a {rows}x{cols} grid, but the image has only "
                f"{len(ids)} tokens"
            )
        template = self.image_template(rows, cols).tolist()
        prefix_len = len(self.image_prefix(rows, cols))
        row_len = cols + len(self.row_end())
        for pos, (want, got) in enumerate(zip(template, ids)):
            where = self._describe_position(pos, prefix_len, row_len, rows)
            if want == CODE:
                if not (0 <= got < self.vocab_size and bool(self.image_code_mask[got])):
                    return ImageParse(error=f"{where}: expected an image code, got {self._token_name(got)}")
            elif got != want:
                return ImageParse(error=f"{where}: expected {self._token_name(want)}, got {self._token_name(got)}")
        if len(ids) < len(template):
            where = self._describe_position(len(ids), prefix_len, row_len, rows)
            return ImageParse(error=f"truncated image: {len(ids)} of {len(template)} tokens, ends at {where}")
        if len(ids) > len(template):
            return ImageParse(error=f"{len(ids) - len(template)} extra tokens after the end of a {rows}x{cols} image")
        code_ids = torch.tensor([i for i, t in zip(ids, template) if t == CODE], dtype=torch.long)
        return ImageParse(codes=self.token_to_code[code_ids].view(rows, cols))

    def _describe_position(self, pos: int, prefix_len: int, row_len: int, rows: int) -> str:
        if pos < prefix_len:
            return f"token {pos} (image header)"
        row, col = divmod(pos - prefix_len, row_len)
        if row >= rows:
            return f"token {pos} (image trailer)"
        return f"token {pos} (row {row}, column {col})"

    def _token_name(self, token_id: int) -> str:
        if token_id < 0 or token_id >= self.vocab_size:
            return f"out-of-vocabulary id {token_id}"
        return f"{self.tokenizer.convert_ids_to_tokens(int(token_id))!r} (id {token_id})"

    # ----- text -------------------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_text(self, ids) -> str:
        """Text of ``ids``; ids outside the vocabulary are left out (the tokenizer raises on ids below 0 or from
        2**32 on, and a model's output can hold anything)."""
        ids = [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
        return self.tokenizer.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=False)

    @property
    def prompt_suffix_ids(self) -> list[int]:
        """Forced ids after the prompt's text: the family's end of the user's turn (none by default)."""
        return []

    @property
    def bos_token_ids(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [] if bos is None else [int(bos)]

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return None if eos is None else int(eos)
