"""PURE / Lumina-mGPT backend: the RealSR-R1 paper's own model family.

The language model is Chameleon (Lumina-mGPT 7B as fine-tuned by PURE); its image tokens are LlamaGen's VQ-8 codes
(``vq_ds8_c2i.pt``: downsample 8, 16384 codes of dimension 8, l2-normalised), not Chameleon's own VQGAN. Layout of
one image, as PURE's ``FlexARItemProcessor.process_image`` writes it (``pure/data/item_processor.py``)::

    <racm3:break> <reserved{8800+h}> <reserved{8800+w}> (code x 4w, <reserved08799>) x 4h <eoss>

h and w count 32-pixel units, so an image of 32h x 32w pixels has a 4h x 4w code grid: 276, 1060 and 4164 tokens at
128², 256² and 512². Code c is the token named ``IMGIMG`` + c's digits written as letters (0 -> A, ..., 9 -> J) + one
closing letter, Chameleon's naming (PURE ``model/chameleon_vae_ori/vocab.py`` ``VocabTranslation.bpe2img``): in the
published vocabulary the 8192 Chameleon image slots (ids 4-8195) and 8192 rows added above the 65536-token text
vocabulary (65536-73727). The tokenizer's names are the one source of the code -> id mapping.

One checkpoint folder holds both models: ``PureForConditionalGeneration`` is transformers' Chameleon with the VQ
model as a submodule (``image_tokenizer``), so saving, sharding, DeepSpeed, LoRA and the Hub treat it as one model.
``vlcot-grpo convert`` (``vlcot_grpo.models.convert``) builds such a folder from the published files.
"""

from __future__ import annotations

import re
from functools import cached_property

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    JanusVQVAE,
    JanusVQVAEConfig,
    PreTrainedConfig,
)
from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

from vlcot_grpo.models.base import ImageTokenBackend, unwrap_model
from vlcot_grpo.models.llamagen import decode_codes, encode_to_codes

MODEL_TYPE = "vlcot_pure"
IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"
END_OF_ROW = "<reserved08799>"
#: PURE's conversation separator (``pure/data/convertsation.py``): it ends every turn, so it ends the prompt.
END_OF_TURN = "<reserved08706>"
#: ``<reserved{SIZE_BASE + n}>`` announces n 32-pixel units (PURE ``get_n_grids_token``).
SIZE_BASE = 8800
#: Codes per size unit: 32 pixels at downsample 8.
CODES_PER_UNIT = 4
LAYOUT_TOKENS = (IMAGE_START, IMAGE_END, END_OF_ROW)
_DIGIT_LETTERS = "ABCDEFGHIJ"


def size_token(units: int) -> str:
    return f"<reserved{SIZE_BASE + units:05d}>"


def image_code_name(code: int) -> str:
    """Chameleon's token name of image code ``code`` (``IMGIMG`` + digits as letters + a closing ``Z``)."""
    return "IMGIMG" + "".join(_DIGIT_LETTERS[int(d)] for d in str(code)) + "Z"


def code_of_name(name: str) -> int | None:
    """The image code a token name stands for, or None for any other token (the inverse of ``image_code_name``;
    like Chameleon's rule it ignores the closing letter)."""
    if not name.startswith("IMGIMG") or len(name) < 8:
        return None
    digits = name[6:-1]
    if not all(c in _DIGIT_LETTERS for c in digits):
        return None
    return int("".join(str(_DIGIT_LETTERS.index(c)) for c in digits))


def code_ids_from_vocab(vocab: dict[str, int], codebook_size: int, where: str = "the tokenizer") -> torch.Tensor:
    """LongTensor ``(codebook_size,)``: the id of each code, read from the vocabulary's ``IMGIMG`` names; a
    ValueError names what is missing or doubled."""
    ids: dict[int, int] = {}
    for name, token_id in vocab.items():
        code = code_of_name(name)
        if code is None:
            continue
        if code in ids:
            raise ValueError(f"{where}: image code {code} is named twice (ids {ids[code]} and {token_id})")
        ids[code] = int(token_id)
    missing = [c for c in range(codebook_size) if c not in ids]
    extra = sorted(c for c in ids if c >= codebook_size)
    if missing or extra:
        raise ValueError(
            f"{where}: expected image-code tokens IMGIMG… for codes 0-{codebook_size - 1}; "
            f"{len(missing)} missing (first {missing[:5]}), {len(extra)} beyond the codebook (first {extra[:5]})"
        )
    return torch.tensor([ids[c] for c in range(codebook_size)], dtype=torch.long)


@strict
class PureConfig(ChameleonConfig):
    """transformers' Chameleon config plus the image tokenizer's (a ``JanusVQVAEConfig``: LlamaGen's VQ family)."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {**ChameleonConfig.sub_configs_defaults, "image_tokenizer_config": JanusVQVAEConfig}

    image_tokenizer_config: dict | PreTrainedConfig | None = None


class PureForConditionalGeneration(ChameleonForConditionalGeneration):
    """Chameleon that writes images: full logits over the vocabulary, and LlamaGen's VQ-8 as ``image_tokenizer``.

    Two changes to transformers' class, both in ``__init__``:

    * its ``forward`` sets the logits of every ``IMGIMG`` token of ``config.vocabulary_map`` to the dtype's minimum
      (stock Chameleon cannot write images). Here the mapping is empty, so nothing is masked and the one head gives
      the logits the rollouts sample and the trainer scores;
    * Chameleon's own VQGAN encoder (``model.vqmodel``) is dropped: this family's images are LlamaGen codes.

    ``image_tokenizer`` is transformers' ``JanusVQVAE``, whose encoder and decoder are LlamaGen's architecture (key by
    key: ``vlcot_grpo.models.convert``). Its quantizer is not used: LlamaGen picks the nearest code after
    l2-normalising both the feature and the codebook, and ``JanusVQVAEVectorQuantizer.forward`` does not normalise
    (it picks another code for ~17 % of positions on VQ-8), and its ``decode`` takes square grids of one fixed size
    only. ``vlcot_grpo.models.llamagen`` does both steps, on any grid. The VQ model stays in float32, as PURE runs it.
    """

    config_class = PureConfig
    _keep_in_fp32_modules_strict = ["image_tokenizer"]
    _keys_to_ignore_on_load_unexpected = [r"^model\.vqmodel\."]
    _no_split_modules = [
        *ChameleonForConditionalGeneration._no_split_modules,
        "JanusVQVAEAttnBlock",
        "JanusVQVAEResnetBlock",
    ]

    def __init__(self, config: PureConfig):
        super().__init__(config)
        del self.model.vqmodel
        self.model.vocabulary_mapping = ChameleonImageVocabularyMapping({})
        self.image_tokenizer = JanusVQVAE(config.image_tokenizer_config)
        self.post_init()


AutoConfig.register(MODEL_TYPE, PureConfig)
AutoModelForCausalLM.register(PureConfig, PureForConditionalGeneration)


class PureBackend(ImageTokenBackend):
    name = "pure"
    model_class = PureForConditionalGeneration
    #: the language model's projections; the VQ model's attention convolutions (q, k, v, proj_out) never match
    lora_target_modules = r"(.*\.)?model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    #: None: ``vlcot-grpo prepare`` appends the 14 tags as new tokens. Chameleon's ``<reservedNNNNN>`` tokens are not
    #: documented as a free range (PURE and Lumina-mGPT take 08706, 08796-08799 and 08800 + n), so none is re-purposed.
    reserved_tag_tokens = None
    full_precision_modules = ("image_tokenizer", "lm_head")
    layout_tokens = (*LAYOUT_TOKENS, END_OF_TURN)

    @cached_property
    def size_ids(self) -> dict[int, int]:
        """units -> id of ``<reserved{8800+units}>``, for every such token the vocabulary has (units >= 1)."""
        sizes = {}
        for name, token_id in self.tokenizer.get_vocab().items():
            match = re.fullmatch(r"<reserved(\d{5})>", name)
            if match and int(match[1]) > SIZE_BASE:
                sizes[int(match[1]) - SIZE_BASE] = int(token_id)
        return sizes

    @property
    def vqmodel(self) -> JanusVQVAE:
        return unwrap_model(self.model).image_tokenizer

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vqmodel.config.channel_multiplier) - 1)

    @cached_property
    def code_token_ids(self) -> torch.Tensor:
        return code_ids_from_vocab(self.tokenizer.get_vocab(), self.vqmodel.config.num_embeddings)

    smallest_grid = (CODES_PER_UNIT, CODES_PER_UNIT)

    @cached_property
    def layout_token_ids(self) -> list[int]:
        # every size token, not only those of the smallest grid: none is ever text
        return sorted(set(super().layout_token_ids) | set(self.size_ids.values()))

    @property
    def prompt_suffix_ids(self) -> list[int]:
        return [self._ids[END_OF_TURN]]

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        unit = self.downsample * CODES_PER_UNIT
        if height <= 0 or width <= 0 or height % unit or width % unit:
            raise ValueError(
                f"image size {height}x{width}: the PURE layout counts sizes in {unit}-pixel units "
                f"({CODES_PER_UNIT} codes at downsample {self.downsample}); use multiples of {unit}"
            )
        return height // self.downsample, width // self.downsample

    def _units(self, codes: int) -> int:
        units = codes // CODES_PER_UNIT
        if codes % CODES_PER_UNIT or units not in self.size_ids:
            have = max(self.size_ids, default=0)
            raise ValueError(
                f"a {codes}-code side has no PURE size token: sides are multiples of {CODES_PER_UNIT} codes up to "
                f"{have * CODES_PER_UNIT} (the tokenizer's largest is {size_token(have)})"
            )
        return units

    def image_prefix(self, rows: int, cols: int) -> list[int]:
        return [self._ids[IMAGE_START], self.size_ids[self._units(rows)], self.size_ids[self._units(cols)]]

    def row_end(self) -> list[int]:
        return [self._ids[END_OF_ROW]]

    def image_suffix(self) -> list[int]:
        return [self._ids[IMAGE_END]]

    def read_grid(self, ids: list[int]) -> tuple[int, int] | str:
        if not ids:
            return "empty image: no tokens"
        if ids[0] != self._ids[IMAGE_START]:
            return f"token 0 (image header): expected {IMAGE_START!r}, got {self._token_name(ids[0])}"
        units = {token_id: n for n, token_id in self.size_ids.items()}
        sides = []
        for pos in (1, 2):
            if len(ids) <= pos or ids[pos] not in units:
                got = self._token_name(ids[pos]) if len(ids) > pos else "the end of the image"
                return f"token {pos} (image header): expected a size token <reserved08801>…, got {got}"
            sides.append(units[ids[pos]] * CODES_PER_UNIT)
        return sides[0], sides[1]

    # ----- pixels <-> codes: LlamaGen's VQModel.encode / decode_code, on any grid (vlcot_grpo.models.llamagen) ----
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_to_codes(self.vqmodel, pixels)

    def _decode_grids(self, codes: torch.Tensor) -> torch.Tensor:
        return decode_codes(self.vqmodel, codes)
