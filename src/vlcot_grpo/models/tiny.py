"""Tiny Emu3-architecture models built from a config, for tests, the demo and benchmarks. No download, seedable.

The tokenizer is character-level (``tokenizers`` WordLevel over printable ASCII) plus special tokens: Emu3's image
layout tokens, the 14 VLCoT tags and one token per VQ code. It is saved next to the model and loaded back through
``from_pretrained`` exactly as a real checkpoint is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import Emu3Config, Emu3ForConditionalGeneration, PreTrainedTokenizerFast

from vlcot_grpo.models.base import without_zero3_init
from vlcot_grpo.models.emu3 import IMAGE_PLACEHOLDER_TOKEN, LAYOUT_TOKENS, visual_token
from vlcot_grpo.vlcot import TAGS

#: File in a tiny checkpoint's folder recording the spec it was built from.
SPEC_FILE = "tiny_spec.json"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


@dataclass
class TinyEmu3Spec:
    """Shape of a tiny Emu3 model. Defaults give a ~0.5 M-parameter model that runs in milliseconds on a CPU."""

    hidden_size: int = field(default=64, metadata={"help": "Width of the language model."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Key/value heads (grouped-query attention)."})
    intermediate_size: int = field(default=128, metadata={"help": "MLP width."})
    max_position_embeddings: int = field(default=4096, metadata={"help": "Longest sequence (RoPE)."})
    codebook_size: int = field(default=256, metadata={"help": "VQ codebook entries (one token each)."})
    vq_base_channels: int = field(default=32, metadata={"help": "VQ conv width; a multiple of 32 (GroupNorm)."})
    vq_channel_multiplier: tuple[int, ...] = field(
        default=(1, 1, 2), metadata={"help": "VQ stages; downsample factor is 2 ** (len - 1)."}
    )
    vq_embed_dim: int = field(default=4, metadata={"help": "Code vector size."})
    seed: int = field(default=0, metadata={"help": "Seed for the random weights."})


def build_tiny_tokenizer(codebook_size: int) -> PreTrainedTokenizerFast:
    chars = [chr(c) for c in range(32, 127)]
    specials = [PAD, BOS, EOS, UNK, *LAYOUT_TOKENS, IMAGE_PLACEHOLDER_TOKEN, *TAGS]
    specials += [visual_token(c) for c in range(codebook_size)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    return tokenizer


def tiny_emu3_config(spec: TinyEmu3Spec, vocab: dict[str, int], pad_id: int, bos_id: int, eos_id: int) -> Emu3Config:
    """The Emu3 config of a tiny model of shape ``spec`` over the tokenizer vocabulary ``vocab`` (token -> id)."""
    return Emu3Config(
        vq_config={
            "codebook_size": spec.codebook_size,
            "embed_dim": spec.vq_embed_dim,
            "latent_channels": spec.vq_embed_dim,
            "temporal_downsample_factor": 1,
            "base_channels": spec.vq_base_channels,
            "channel_multiplier": list(spec.vq_channel_multiplier),
            "num_res_blocks": 1,
            "attn_resolutions": [],
            # the VQ middle block's attention runs at the last stage's width
            "hidden_size": spec.vq_base_channels * spec.vq_channel_multiplier[-1],
            "num_attention_heads": 1,
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_hidden_layers,
            "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.num_key_value_heads,
            "max_position_embeddings": spec.max_position_embeddings,
            "pad_token_id": pad_id,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "attention_dropout": 0.0,
        },
        vocabulary_map=vocab,
    )


def build_emu3_model(config: Emu3Config, seed: int):
    """A randomly initialised Emu3 model of ``config``, deterministic for a given ``seed``."""
    torch.manual_seed(seed)
    with without_zero3_init():
        return Emu3ForConditionalGeneration(config).eval()


def build_tiny_emu3(spec: TinyEmu3Spec | None = None):
    """A randomly initialised tiny Emu3 model and its tokenizer, deterministic for a given ``spec.seed``."""
    spec = spec or TinyEmu3Spec()
    tokenizer = build_tiny_tokenizer(spec.codebook_size)
    config = tiny_emu3_config(
        spec, tokenizer.get_vocab(), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    return build_emu3_model(config, spec.seed), tokenizer


def save_tiny_emu3(path: str | Path, spec: TinyEmu3Spec | None = None) -> Path:
    """Build a tiny model and save model + tokenizer to ``path`` (a checkpoint loadable by ``from_pretrained``)."""
    spec = spec or TinyEmu3Spec()
    path = Path(path)
    model, tokenizer = build_tiny_emu3(spec)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))
    return path


def ensure_tiny_emu3(path: str | Path, spec: TinyEmu3Spec | None = None) -> Path:
    """Reuse the tiny checkpoint at ``path`` if it was built from the same spec, else (re)build it."""
    spec = spec or TinyEmu3Spec()
    path = Path(path)
    marker = path / SPEC_FILE
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(asdict(spec))):
        return path
    return save_tiny_emu3(path, spec)
