"""Emu3 backend: one vocabulary and one head for text and image codes, any grid size.

Layout of one image (as ``transformers``' ``Emu3Processor`` writes it)::

    <|image start|> "rows*cols" <|image token|> (code x cols, <|extra_200|>) x rows <|extra_201|> <|image end|>

The size is ordinary text ("16*16"), so its tokens are forced but stay sampleable as text elsewhere.
"""

from __future__ import annotations

import re
from functools import cached_property

import torch
from transformers import Emu3ForConditionalGeneration

from vlcot_grpo.models.base import ImageTokenBackend, unwrap_model

IMAGE_START = "<|image start|>"
IMAGE_END = "<|image end|>"
IMAGE_WRAPPER = "<|image token|>"
END_OF_ROW = "<|extra_200|>"
END_OF_FRAME = "<|extra_201|>"
IMAGE_PLACEHOLDER_TOKEN = "<image>"
LAYOUT_TOKENS = (IMAGE_START, IMAGE_END, IMAGE_WRAPPER, END_OF_ROW, END_OF_FRAME)


def visual_token(code: int) -> str:
    return f"<|visual token {code:06d}|>"


class Emu3Backend(ImageTokenBackend):
    name = "emu3"
    model_class = Emu3ForConditionalGeneration
    #: LoRA targets: the language model's projections only (the VQ model has q/k/v projections too, and is frozen)
    lora_target_modules = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    #: The tags take reserved ``<|extra_N|>`` tokens, as transformers' own converter gave ``<|extra_0|>`` to
    #: ``<image>``: the published vocabulary (184622) and every weight shape stay as they are. Of the 205 reserved
    #: tokens, BAAI's tokenizer and processor name ``<|extra_200|>`` (end of row), ``<|extra_201|>`` (end of frame),
    #: ``<|extra_203|>`` (bos) and ``<|extra_204|>`` (eos); 1-14 are the first that no code names.
    reserved_tag_tokens = tuple(f"<|extra_{i}|>" for i in range(1, 15))
    #: The VQ model encodes the targets and decodes the pictures: never quantized. The head keeps its tag rows exact.
    full_precision_modules = ("model.vqmodel", "lm_head")
    layout_tokens = LAYOUT_TOKENS

    @property
    def downsample(self) -> int:
        return int(self.vqmodel.vision_spatial_factor)

    @cached_property
    def code_token_ids(self) -> torch.Tensor:
        img2bpe = unwrap_model(self.model).vocabulary_mapping.img2bpe
        return torch.tensor([img2bpe[c] for c in range(len(img2bpe))], dtype=torch.long)

    def _size_token_ids(self, rows: int, cols: int) -> list[int]:
        return self.encode_text(f"{rows}*{cols}")

    def image_prefix(self, rows: int, cols: int) -> list[int]:
        return [self._ids[IMAGE_START], *self._size_token_ids(rows, cols), self._ids[IMAGE_WRAPPER]]

    def row_end(self) -> list[int]:
        return [self._ids[END_OF_ROW]]

    def image_suffix(self) -> list[int]:
        return [self._ids[END_OF_FRAME], self._ids[IMAGE_END]]

    def read_grid(self, ids: list[int]) -> tuple[int, int] | str:
        if not ids:
            return "empty image: no tokens"
        if ids[0] != self._ids[IMAGE_START]:
            return f"token 0 (image header): expected {IMAGE_START!r}, got {self._token_name(ids[0])}"
        wrapper = self._ids[IMAGE_WRAPPER]
        header = ids[1:24]
        if wrapper not in header:
            return f"image header: no {IMAGE_WRAPPER!r} after the size tokens"
        size_text = self.decode_text(header[: header.index(wrapper)])
        match = re.fullmatch(r"\s*(\d+)\s*\*\s*(\d+)\s*", size_text)
        if not match or int(match[1]) == 0 or int(match[2]) == 0:
            return f"image header: size tokens read {size_text!r}, expected 'rows*cols'"
        return int(match[1]), int(match[2])

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        vq = self.vqmodel
        param = next(vq.parameters())
        sizes = torch.tensor([pixels.shape[-2:]] * pixels.shape[0])
        out = vq.encode(pixels.to(param.device, param.dtype), sizes, return_dict=True)
        return torch.stack(list(out.image_tokens))

    def _decode_grids(self, codes: torch.Tensor) -> torch.Tensor:
        vq = self.vqmodel
        return vq.decode(codes.to(next(vq.parameters()).device))
