"""Look-alike checkpoints: a tiny model of each supported family, saved the way the family's real checkpoint is
published, so that tests can run the real-model path (``vlcot-grpo prepare`` first) offline, in seconds.

A look-alike differs from the real checkpoint only in size and in its (random) weights. What it keeps is what the
project's code can trip over: the tokenizer class and its files, the special-token layout (which ids the reserved,
role and image tokens sit at, relative to each other), the config fields and the weight file names. Unlike the
tiny model of ``vlcot_grpo.models.tiny``, it has no VLCoT tags: those are what ``vlcot-grpo prepare`` adds.

``LOOKALIKES`` maps a backend's ``model_type`` to the function that saves its look-alike; a new family adds one.

Emu3 (``BAAI/Emu3-Gen-hf``, ``BAAI/Emu3-Chat-hf``), as read from (facts, not code):

* transformers' ``models/emu3/convert_emu3_weights_to_hf.py``: the tiktoken vocabulary becomes a byte-level BPE
  ``tokenizer.json`` (ByteLevel pre-tokenizer without prefix space, ByteLevel decoder, no unk token, every special
  token an added token with ``special: true, normalized: false``), plus ``vocab.json``, ``merges.txt``,
  ``special_tokens_map.json`` and ``tokenizer_config.json`` with ``tokenizer_class: GPT2Tokenizer``, bos
  ``<|extra_203|>``, eos ``<|extra_204|>``, pad ``<|endoftext|>``. The reserved ``<|extra_0|>`` is renamed ``<image>``
  (the processor's placeholder) at the same id. The tokenizer is saved with the extra special tokens ``image_token``,
  ``boi_token``, ``eoi_token``, ``image_wrapper_token``, ``eof_token`` and left padding; the config is
  ``Emu3Config(text_config=..., vocabulary_map=<tokenizer.json's vocab>)`` with a generation config (sampling, top-k
  2048, the tokenizer's pad/eos), the weights sharded safetensors, the processor saved beside them.
* BAAI's original ``emu3/mllm/tokenization_emu3.py`` and ``configuration_emu3.py``: the special tokens follow the
  BPE ranks in the order ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|extra_0|>`` … ``<|extra_204|>``,
  then the vision tokens file: ``<|image token|>``, ``<|image start|>``, ``<|image end|>`` (ids 151851-151853 in the
  config's defaults) and ``<|visual token 000000|>`` … ``<|visual token 032767|>`` up to the vocabulary size 184622.
  ``<|extra_200|>`` ends an image row, ``<|extra_201|>`` a frame.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlcot_grpo.models.emu3 import (
    END_OF_FRAME,
    IMAGE_END,
    IMAGE_PLACEHOLDER_TOKEN,
    IMAGE_START,
    IMAGE_WRAPPER,
    visual_token,
)
from vlcot_grpo.models.tiny import SPEC_FILE, TinyEmu3Spec, build_emu3_model, tiny_emu3_config

#: Emu3's reserved tokens (from its original tokenizer): ``<|extra_0|>`` … ``<|extra_204|>``.
EMU3_EXTRAS = 205
EMU3_ENDOFTEXT, EMU3_IM_START, EMU3_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EMU3_BOS, EMU3_EOS = "<|extra_203|>", "<|extra_204|>"
#: Shard size of the look-alike's weights: small enough that even the tiny model is saved in several shards, as the
#: real 8B checkpoint is.
LOOKALIKE_SHARD_SIZE = "1MB"


def _bpe_corpus() -> list[str]:
    """English text the look-alike's BPE merges are learnt from: the project's own prompt and degradation words."""
    from vlcot_grpo.data.levels import LEVELS, STEPS
    from vlcot_grpo.vlcot import DEFAULT_PROMPT

    words = [f"{level} {step}" for level in LEVELS for step in STEPS]
    sizes = [f"{n}*{n}" for n in (4, 8, 16, 32, 64, 128)]
    text = [DEFAULT_PROMPT, ", ".join(words), " ".join(sizes), "This image shows a photo of an object in a scene."]
    return text * 4


def _emu3_bpe(vocab_size: int) -> tuple[dict[str, int], list[str]]:
    """A small byte-level BPE (vocab, merges) like Emu3's converted one: 256 byte symbols plus learnt merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    core.train_from_iterator(_bpe_corpus(), trainer)
    model = json.loads(core.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def emu3_special_tokens(codebook_size: int) -> list[str]:
    """Emu3's special tokens in id order, as published after conversion (``<image>`` in ``<|extra_0|>``'s place)."""
    extras = [IMAGE_PLACEHOLDER_TOKEN] + [f"<|extra_{i}|>" for i in range(1, EMU3_EXTRAS)]
    vision = [IMAGE_WRAPPER, IMAGE_START, IMAGE_END] + [visual_token(c) for c in range(codebook_size)]
    return [EMU3_ENDOFTEXT, EMU3_IM_START, EMU3_IM_END, *extras, *vision]


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def _save_emu3_tokenizer(path: Path, codebook_size: int, bpe_vocab_size: int) -> dict[str, int]:
    """Write Emu3's tokenizer files to ``path``; returns the full vocabulary (token -> id)."""
    vocab, merges = _emu3_bpe(bpe_vocab_size)
    first_special = len(vocab)
    specials = {tok: first_special + i for i, tok in enumerate(emu3_special_tokens(codebook_size))}
    vocab.update(specials)
    added = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for tok, i in specials.items()
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    _write_json(
        path / "tokenizer.json",
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": byte_level,
            "post_processor": None,
            "decoder": byte_level | {"add_prefix_space": True},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": False,
                "byte_fallback": False,
                "vocab": vocab,
                "merges": merges,
            },
        },
    )
    _write_json(path / "vocab.json", vocab)
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges))
    roles = {"bos_token": EMU3_BOS, "eos_token": EMU3_EOS, "pad_token": EMU3_ENDOFTEXT}
    _write_json(path / "special_tokens_map.json", roles)
    _write_json(
        path / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
            **roles,
            "clean_up_tokenization_spaces": False,
            "extra_special_tokens": {
                "image_token": IMAGE_PLACEHOLDER_TOKEN,
                "boi_token": IMAGE_START,
                "eoi_token": IMAGE_END,
                "image_wrapper_token": IMAGE_WRAPPER,
                "eof_token": END_OF_FRAME,
            },
            "model_max_length": 1000000000000000019884624838656,
            "padding_side": "left",
            "processor_class": "Emu3Processor",
            "tokenizer_class": "GPT2Tokenizer",
        },
    )
    return vocab


def save_emu3_lookalike(path: str | Path, spec: TinyEmu3Spec | None = None, bpe_vocab_size: int = 400) -> Path:
    """A tiny Emu3 saved as ``BAAI/Emu3-Gen-hf`` is published (see the module docstring): no VLCoT tags."""
    from transformers import Emu3ImageProcessor, GenerationConfig

    spec = spec or TinyEmu3Spec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = _save_emu3_tokenizer(path, spec.codebook_size, bpe_vocab_size)
    config = tiny_emu3_config(spec, vocab, vocab[EMU3_ENDOFTEXT], vocab[EMU3_BOS], vocab[EMU3_EOS])
    model = build_emu3_model(config, spec.seed)
    model.generation_config = GenerationConfig(
        do_sample=True,
        top_k=2048,
        max_new_tokens=50_000,
        pad_token_id=vocab[EMU3_ENDOFTEXT],
        eos_token_id=vocab[EMU3_EOS],
    )
    model.save_pretrained(path, max_shard_size=LOOKALIKE_SHARD_SIZE)
    downsample = 2 ** (len(spec.vq_channel_multiplier) - 1)
    Emu3ImageProcessor(spatial_factor=downsample).save_pretrained(path)
    _write_json(path / "processor_config.json", {"processor_class": "Emu3Processor"})
    (path / SPEC_FILE).unlink(missing_ok=True)  # never taken for a tiny build (build_tiny_model would rebuild it)
    return path


#: model_type -> function saving that family's look-alike checkpoint at a path.
LOOKALIKES = {"emu3": save_emu3_lookalike}
