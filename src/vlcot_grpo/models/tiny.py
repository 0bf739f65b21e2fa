"""Tiny models of each family (Emu3; PURE: Chameleon + LlamaGen VQ-8) built from a config, for tests, the demo and
benchmarks. No download, seedable.

The tokenizer is character-level (``tokenizers`` WordLevel over printable ASCII) plus special tokens: Emu3's image
layout tokens, the 14 VLCoT tags and one token per VQ code. It is saved next to the model and loaded back through
``from_pretrained`` exactly as a real checkpoint is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
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


#: The tiny Chameleon VQGAN every Chameleon-based model builds and PURE then drops: the smallest that builds.
TINY_CHAMELEON_VQ = {
    "base_channels": 32,
    "channel_multiplier": [1],
    "num_res_blocks": 1,
    "embed_dim": 4,
    "num_embeddings": 16,
    "latent_channels": 32,
    "resolution": 32,
}


@dataclass
class TinyLMSpec:
    """The language model's shape, the same fields in every family (``lm_fields`` gives them to a config)."""

    hidden_size: int = field(default=64, metadata={"help": "Width of the language model."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(
        default=2, metadata={"help": "Key/value heads (grouped-query attention; Janus-Pro: as many as heads)."}
    )
    intermediate_size: int = field(default=128, metadata={"help": "MLP width."})
    max_position_embeddings: int = field(default=4096, metadata={"help": "Longest sequence (RoPE)."})

    def lm_fields(self) -> dict:
        """The language model's config fields, as transformers names them in every family here."""
        return {f.name: getattr(self, f.name) for f in fields(TinyLMSpec)}


def char_tokenizer(tokens: list[str], specials: list[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per printable ASCII character, as no tiny model needs subwords) over
    ``tokens`` (ids in that order; the first four are pad, bos, eos, unk), ``specials`` kept whole."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return tokenizer


#: the characters of every tiny tokenizer
CHARS = [chr(c) for c in range(32, 127)]


@dataclass
class TinyEmu3Spec(TinyLMSpec):
    """Shape of a tiny Emu3 model. Defaults give a ~0.5 M-parameter model that runs in milliseconds on a CPU."""

    codebook_size: int = field(default=256, metadata={"help": "VQ codebook entries (one token each)."})
    vq_base_channels: int = field(default=32, metadata={"help": "VQ conv width; a multiple of 32 (GroupNorm)."})
    vq_channel_multiplier: tuple[int, ...] = field(
        default=(1, 1, 2), metadata={"help": "VQ stages; downsample factor is 2 ** (len - 1)."}
    )
    vq_embed_dim: int = field(default=4, metadata={"help": "Code vector size."})
    seed: int = field(default=0, metadata={"help": "Seed for the random weights."})
    vq_weights: str = field(
        default="trained",
        metadata={
            "help": "'trained': the VQ tokenizer shipped in the package (vlcot_grpo.models.tiny_vq; it fits the "
            "default VQ fields only), so pictures are recognisable; 'random': random VQ weights (any VQ shape)."
        },
    )


def build_tiny_tokenizer(codebook_size: int) -> PreTrainedTokenizerFast:
    """Character-level; the layout tokens, tags and ``<|visual token N|>`` codes as Emu3's tokenizer names them."""
    specials = [PAD, BOS, EOS, UNK, *LAYOUT_TOKENS, IMAGE_PLACEHOLDER_TOKEN, *TAGS]
    specials += [visual_token(c) for c in range(codebook_size)]
    return char_tokenizer(specials + CHARS, specials[4:])


def tiny_emu3_vq_config(spec: TinyEmu3Spec) -> dict:
    """The ``Emu3VQVAEConfig`` fields of the tiny VQ model of shape ``spec`` (also what ``tiny_vq`` trains)."""
    return {
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
    }


def tiny_emu3_config(spec: TinyEmu3Spec, vocab: dict[str, int], pad_id: int, bos_id: int, eos_id: int) -> Emu3Config:
    """The Emu3 config of a tiny model of shape ``spec`` over the tokenizer vocabulary ``vocab`` (token -> id)."""
    return Emu3Config(
        vq_config=tiny_emu3_vq_config(spec),
        text_config={
            "vocab_size": len(vocab),
            **spec.lm_fields(),
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
    """A tiny Emu3 model and its tokenizer: a randomly initialised language model, deterministic for a given
    ``spec.seed``, and the shipped trained VQ tokenizer (``spec.vq_weights == "trained"``) or a random one."""
    spec = spec or TinyEmu3Spec()
    tokenizer = build_tiny_tokenizer(spec.codebook_size)
    config = tiny_emu3_config(
        spec, tokenizer.get_vocab(), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    model = build_emu3_model(config, spec.seed)
    if spec.vq_weights == "trained":
        load_trained_vq(model.model.vqmodel)
    elif spec.vq_weights != "random":
        raise ValueError(f"TinyEmu3Spec.vq_weights {spec.vq_weights!r}: expected 'trained' or 'random'")
    return model, tokenizer


def load_trained_vq(vqmodel) -> None:
    """Load the shipped tiny VQ weights into ``vqmodel`` (an ``Emu3VQVAE`` of the default tiny VQ shape)."""
    from vlcot_grpo.models.tiny_vq import load_shipped_weights

    weights = load_shipped_weights()
    have = {key: tuple(value.shape) for key, value in vqmodel.state_dict().items()}
    want = {key: tuple(value.shape) for key, value in weights.items()}
    if have != want:
        raise ValueError(
            "the shipped tiny VQ weights fit TinyEmu3Spec's default VQ fields (codebook_size, vq_base_channels, "
            "vq_channel_multiplier, vq_embed_dim) only; for another VQ shape set vq_weights: random"
        )
    vqmodel.load_state_dict(weights)


def save_tiny_emu3(path: str | Path, spec: TinyEmu3Spec | None = None) -> Path:
    """Build a tiny Emu3 and save model + tokenizer to ``path`` (a checkpoint loadable by ``from_pretrained``)."""
    return save_tiny_model(path, "emu3", spec)


def ensure_tiny_emu3(path: str | Path, spec: TinyEmu3Spec | None = None) -> Path:
    """Reuse the tiny Emu3 at ``path`` if it was built from the same spec, else (re)build it."""
    return ensure_tiny_model(path, "emu3", spec)


# ----- PURE / Lumina-mGPT (Chameleon language model, LlamaGen VQ-8 image tokenizer) ----------------------------------
@dataclass
class TinyPureSpec(TinyLMSpec):
    """Shape of a tiny PURE model: Chameleon's architecture and LlamaGen VQ-8's (four stages: downsample 8)."""

    codebook_size: int = field(default=256, metadata={"help": "VQ codebook entries (one token each)."})
    vq_base_channels: int = field(default=32, metadata={"help": "VQ conv width; a multiple of 32 (GroupNorm)."})
    vq_channel_multiplier: tuple[int, ...] = field(
        default=(1, 2, 2, 4), metadata={"help": "VQ stages (LlamaGen VQ-8's); downsample is 2 ** (len - 1)."}
    )
    vq_embed_dim: int = field(default=8, metadata={"help": "Code vector size (VQ-8: 8)."})
    vq_latent_channels: int = field(default=32, metadata={"help": "VQ latent width (VQ-8: 256)."})
    vq_num_res_blocks: int = field(default=1, metadata={"help": "VQ residual blocks per stage (VQ-8: 2)."})
    max_size_units: int = field(default=32, metadata={"help": "Size tokens <reserved08801>… (32-pixel units)."})
    vocab_size: int | None = field(
        default=None,
        metadata={"help": "Pad the vocabulary with special filler tokens to this size (benchmarks: PURE's 73728)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for the random weights."})


def pure_layout_tokens(max_size_units: int) -> list[str]:
    """PURE's image layout tokens, its end of turn and its size tokens (see ``vlcot_grpo.models.pure``)."""
    from vlcot_grpo.models.pure import END_OF_TURN, LAYOUT_TOKENS, size_token

    return [*LAYOUT_TOKENS, END_OF_TURN, *(size_token(n) for n in range(1, max_size_units + 1))]


def build_tiny_pure_tokenizer(
    codebook_size: int, max_size_units: int, vocab_size: int | None = None
) -> PreTrainedTokenizerFast:
    """Character-level, as the tiny Emu3's; the codes' ``IMGIMG`` names sit in two blocks, before and after the
    text, as the published vocabulary holds 8192 in Chameleon's image slots and 8192 above the text."""
    from vlcot_grpo.models.pure import image_code_name

    half = codebook_size // 2
    head = [PAD, BOS, EOS, UNK, *(image_code_name(c) for c in range(half)), *pure_layout_tokens(max_size_units)]
    tail = [*TAGS, *(image_code_name(c) for c in range(half, codebook_size))]
    fillers = max(0, (vocab_size or 0) - len(head) - len(CHARS) - len(tail))
    tail += [f"<filler_{i}>" for i in range(fillers)]
    return char_tokenizer(head + CHARS + tail, head[4:] + tail)


def llamagen_vq_fields(spec) -> dict:
    """The LlamaGen VQ's shape (PURE's image tokenizer and Janus's VQ model name the fields alike)."""
    return {
        "num_embeddings": spec.codebook_size,
        "embed_dim": spec.vq_embed_dim,
        "latent_channels": spec.vq_latent_channels,
        "base_channels": spec.vq_base_channels,
        "channel_multiplier": list(spec.vq_channel_multiplier),
        "num_res_blocks": spec.vq_num_res_blocks,
    }


def tiny_pure_config(spec: TinyPureSpec, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    """The ``PureConfig`` of a tiny model of shape ``spec``."""
    from vlcot_grpo.models.pure import PureConfig

    return PureConfig(
        vocab_size=vocab_size,
        **spec.lm_fields(),
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        vocabulary_map={},
        # Chameleon's own VQGAN is built by ChameleonModel and then dropped (PureForConditionalGeneration)
        vq_config=TINY_CHAMELEON_VQ,
        image_tokenizer_config=llamagen_vq_fields(spec),
    )


def build_pure_model(config, seed: int):
    """A randomly initialised ``PureForConditionalGeneration`` of ``config``, deterministic for ``seed``."""
    from vlcot_grpo.models.pure import PureForConditionalGeneration

    torch.manual_seed(seed)
    with without_zero3_init():
        return PureForConditionalGeneration(config).eval()


def build_tiny_pure(spec: TinyPureSpec | None = None):
    """A randomly initialised tiny PURE model and its tokenizer."""
    spec = spec or TinyPureSpec()
    tokenizer = build_tiny_pure_tokenizer(spec.codebook_size, spec.max_size_units, spec.vocab_size)
    config = tiny_pure_config(
        spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    return build_pure_model(config, spec.seed), tokenizer


#: family -> (spec class, builder): what ``build_tiny_model`` (``tiny_model_family``) can build.
TINY_FAMILIES = {"emu3": (TinyEmu3Spec, build_tiny_emu3), "pure": (TinyPureSpec, build_tiny_pure)}


def save_tiny_model(path: str | Path, family: str = "emu3", spec=None) -> Path:
    """Build a tiny model of ``family`` and save model + tokenizer to ``path``."""
    spec_class, build = TINY_FAMILIES[family]
    spec = spec or spec_class()
    path = Path(path)
    model, tokenizer = build(spec)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / SPEC_FILE).write_text(json.dumps(_spec_record(family, spec), indent=2))
    return path


def _spec_record(family: str, spec) -> dict:
    """What SPEC_FILE holds: family and spec, and the digest of shipped VQ weights, so that a checkpoint built
    before the weights were retrained is rebuilt."""
    record = {"family": family, **asdict(spec)}
    if record.get("vq_weights") == "trained":
        from vlcot_grpo.models.tiny_vq import weights_digest

        record["vq_weights_sha256"] = weights_digest()
    return record


def ensure_tiny_model(path: str | Path, family: str = "emu3", spec=None) -> Path:
    """Reuse the tiny checkpoint at ``path`` if it was built from the same family and spec, else (re)build it."""
    spec = spec or TINY_FAMILIES[family][0]()
    path = Path(path)
    marker = path / SPEC_FILE
    want = json.loads(json.dumps(_spec_record(family, spec)))
    if marker.exists():
        have = json.loads(marker.read_text())
        have.setdefault("family", "emu3")  # written before there was a second family
        if have == want:
            return path
    return save_tiny_model(path, family, spec)


# ----- Janus / Janus-Pro (Llama language model; image codes on their own table and head) ---------------------------
@dataclass
class TinyJanusSpec(TinyLMSpec):
    """Shape of a tiny Janus: Llama language model, SigLIP understanding encoder, LlamaGen VQ image tokenizer."""

    codebook_size: int = field(default=256, metadata={"help": "VQ codebook entries (Janus: 16384)."})
    vq_base_channels: int = field(default=32, metadata={"help": "VQ conv width; a multiple of 32 (GroupNorm)."})
    vq_channel_multiplier: tuple[int, ...] = field(
        default=(1, 1, 2), metadata={"help": "VQ stages; downsample is 2 ** (len - 1) (Janus's VQ-16: 1,1,2,2,4)."}
    )
    vq_embed_dim: int = field(default=8, metadata={"help": "Code vector size (Janus: 8)."})
    vq_latent_channels: int = field(default=32, metadata={"help": "VQ latent width (Janus: 256)."})
    vq_num_res_blocks: int = field(default=1, metadata={"help": "VQ residual blocks per stage (Janus: 2)."})
    unused_text_rows: int = field(
        default=16, metadata={"help": "Text-table rows beyond the tokenizer (Janus-Pro: 102400 rows, 100015 ids)."}
    )
    vocab_size: int | None = field(
        default=None, metadata={"help": "Pad the text table to this many rows (benchmarks: Janus-Pro's 102400)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the random weights."})


#: Janus's special tokens that the tiny tokenizers carry (image start / end, understanding placeholder, roles)
JANUS_SPECIALS = ("<begin_of_image>", "<end_of_image>", "<image_placeholder>", "<|User|>", "<|Assistant|>")


def build_tiny_janus_tokenizer(with_tags: bool = True) -> PreTrainedTokenizerFast:
    """Character-level, as the other tiny tokenizers; no code tokens: Janus's codes live outside the text table."""
    specials = [PAD, BOS, EOS, UNK, *JANUS_SPECIALS, *(TAGS if with_tags else ())]
    return char_tokenizer(specials + CHARS, specials[4:])


def tiny_janus_config(spec: TinyJanusSpec, tokenizer):
    """The ``JanusConfig`` of a tiny model of shape ``spec`` over ``tokenizer``."""
    from transformers import JanusConfig

    rows = max(len(tokenizer) + spec.unused_text_rows, spec.vocab_size or 0)
    hidden = spec.hidden_size
    return JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": rows,
            **spec.lm_fields(),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "tie_word_embeddings": False,
        },
        # the understanding encoder is not used by the VLCoT path: the smallest that builds
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
            "projection_dim": hidden,
            "num_image_tokens": 4,
        },
        vq_config={
            **llamagen_vq_fields(spec),
            # the image aligner writes, and the image head reads, the language model's width
            "projection_dim": hidden,
            "image_token_embed_dim": hidden,
        },
        image_token_id=int(tokenizer.convert_tokens_to_ids("<image_placeholder>")),
        tie_word_embeddings=False,
    )


def build_janus_model(config, seed: int, cls=None):
    """A randomly initialised Janus of ``config`` (``JanusForVLCoT`` unless ``cls``), deterministic for ``seed``."""
    from vlcot_grpo.models.janus import JanusForVLCoT

    torch.manual_seed(seed)
    with without_zero3_init():
        return (cls or JanusForVLCoT)(config).eval()


def build_tiny_janus(spec: TinyJanusSpec | None = None):
    """A randomly initialised tiny Janus and its tokenizer."""
    spec = spec or TinyJanusSpec()
    tokenizer = build_tiny_janus_tokenizer()
    return build_janus_model(tiny_janus_config(spec, tokenizer), spec.seed), tokenizer


TINY_FAMILIES["janus"] = (TinyJanusSpec, build_tiny_janus)
