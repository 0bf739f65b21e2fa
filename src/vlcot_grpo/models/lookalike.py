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

import torch

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


#: The byte-level pre-tokenizer (and, but for Emu3's prefix space, decoder) of the published BPE tokenizers.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def _special_added_token(token_id: int, content: str) -> dict:
    """A ``tokenizer.json`` ``added_tokens`` entry of a special token, as the published checkpoints write it."""
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _write_bpe_tokenizer_json(path: Path, added: list[dict], vocab, merges, unk_token, decoder: dict) -> None:
    """Write a byte-level BPE ``tokenizer.json`` (no normalizer, no post-processor) to ``path``."""
    _write_json(
        path,
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": _BYTE_LEVEL,
            "post_processor": None,
            "decoder": decoder,
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": unk_token,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": False,
                "byte_fallback": False,
                "vocab": vocab,
                "merges": merges,
            },
        },
    )


def _emu3_tokenizer_config(added: list[dict], roles: dict[str, str]) -> dict:
    """Emu3's ``tokenizer_config.json``: its added tokens, roles, extra special tokens and left padding."""
    return {
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
    }


def _save_emu3_tokenizer(path: Path, codebook_size: int, bpe_vocab_size: int) -> dict[str, int]:
    """Write Emu3's tokenizer files to ``path``; returns the full vocabulary (token -> id)."""
    vocab, merges = _emu3_bpe(bpe_vocab_size)
    first_special = len(vocab)
    specials = {tok: first_special + i for i, tok in enumerate(emu3_special_tokens(codebook_size))}
    vocab.update(specials)
    added = [_special_added_token(i, tok) for tok, i in specials.items()]
    decoder = _BYTE_LEVEL | {"add_prefix_space": True}
    _write_bpe_tokenizer_json(path / "tokenizer.json", added, vocab, merges, None, decoder)
    _write_json(path / "vocab.json", vocab)
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges))
    roles = {"bos_token": EMU3_BOS, "eos_token": EMU3_EOS, "pad_token": EMU3_ENDOFTEXT}
    _write_json(path / "special_tokens_map.json", roles)
    _write_json(path / "tokenizer_config.json", _emu3_tokenizer_config(added, roles))
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


# ----- PURE / Lumina-mGPT ---------------------------------------------------------------------------------------------
# What ``vlcot-grpo convert`` reads, saved as published (facts from the upstream sources, not their code):
#
# * the checkpoint folder (``nonwhy/PURE``, ``Alpha-VLLM/Lumina-mGPT-7B-*``): ``config.json`` of PURE's
#   ``ChameleonXLLMXConfig`` (model_type ``chameleon``, ``model_parallel_size``, ``mask_image_logits``,
#   ``z_loss_weight``, the tokenizer's ``vocabulary_map``), sharded safetensors in transformers' Chameleon key names
#   with the query/key LayerNorms as ``(model_parallel_size, head_dim)`` (PURE ``modeling_chameleon.py``
#   ``ChameleonLayerNorm``), Chameleon's VQGAN under ``model.vqmodel``, and a fast tokenizer whose first ids are
#   ``<s> <pad> </s> <unk>``, then Chameleon's 8192 image slots ``IMGIMG…`` (ids 4-8195), then special and
#   ``<reservedNNNNN>`` tokens and the BPE text; PURE's 8192 further codes sit above the text (65536-73727), a
#   Lumina-mGPT base has none;
# * ``vq_ds8_c2i.pt``: ``{"model": LlamaGen VQModel state dict, ...}`` (LlamaGen ``tokenizer/tokenizer_image/
#   vq_train.py`` also saves the optimiser, the discriminator, the step and its ``argparse`` options), keys as
#   ``llamagen_vq_shapes`` lists them.
PURE_BOS, PURE_PAD, PURE_EOS, PURE_UNK = "<s>", "<pad>", "</s>", "<unk>"


def llamagen_vq_shapes(base=32, multiplier=(1, 2, 2, 4), res_blocks=1, latent=32, codebook=256, code_dim=8):
    """Key -> shape of LlamaGen's ``VQModel`` state dict (``tokenizer/tokenizer_image/vq_model.py``: ``Encoder``
    and ``Decoder`` hold ``conv_blocks`` of ``res`` ResnetBlocks, ``attn`` AttnBlocks at the lowest resolution and
    a ``downsample`` / ``upsample`` conv; ``mid`` is [ResnetBlock, AttnBlock, ResnetBlock]; the decoder's levels run
    from the lowest resolution up, with one ResnetBlock more per level; ``quantize`` keeps ``codebook_used``)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, out, inp, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp, k, k), (out,)

    def norm(name, ch):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (ch,), (ch,)

    def res(name, inp, out):
        norm(f"{name}.norm1", inp), conv(f"{name}.conv1", out, inp, 3)
        norm(f"{name}.norm2", out), conv(f"{name}.conv2", out, out, 3)
        if inp != out:
            conv(f"{name}.nin_shortcut", out, inp, 1)

    def attn(name, ch):
        norm(f"{name}.norm", ch)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", ch, ch, 1)

    last = len(multiplier) - 1
    conv("encoder.conv_in", base, 3, 3)
    block_in = base
    for i, m in enumerate(multiplier):
        for j in range(res_blocks):
            res(f"encoder.conv_blocks.{i}.res.{j}", block_in, base * m)
            block_in = base * m
            if i == last:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != last:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3)
    for side in ("encoder", "decoder"):
        ch = base * multiplier[-1]
        res(f"{side}.mid.0", ch, ch), attn(f"{side}.mid.1", ch), res(f"{side}.mid.2", ch, ch)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", latent, block_in, 3)
    conv("decoder.conv_in", block_in, latent, 3)
    for idx, i in enumerate(reversed(range(len(multiplier)))):
        for j in range(res_blocks + 1):
            res(f"decoder.conv_blocks.{idx}.res.{j}", block_in, base * multiplier[i])
            block_in = base * multiplier[i]
            if i == last:
                attn(f"decoder.conv_blocks.{idx}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.conv_blocks.{idx}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", 3, block_in, 3)
    conv("quant_conv", code_dim, latent, 1), conv("post_quant_conv", latent, code_dim, 1)
    shapes["quantize.embedding.weight"] = (codebook, code_dim)
    shapes["quantize.codebook_used"] = (65536,)
    return shapes


def pure_vocabulary(codebook_size: int, bpe: dict[str, int], codes_above_text: bool, max_size_units: int = 32):
    """The look-alike's vocabulary (token -> id) in the published order (see above)."""
    from vlcot_grpo.models.pure import IMAGE_END, IMAGE_START, image_code_name, size_token
    from vlcot_grpo.models.tiny import pure_layout_tokens

    half = codebook_size // 2
    head = [PURE_BOS, PURE_PAD, PURE_EOS, PURE_UNK, *(image_code_name(c) for c in range(half))]
    head += [t for t in pure_layout_tokens(max_size_units) if t not in (IMAGE_START, IMAGE_END)]
    head = head[: 4 + half] + [IMAGE_END, IMAGE_START] + head[4 + half :]
    assert size_token(1) in head
    vocab = {tok: i for i, tok in enumerate(head)}
    for tok in sorted(bpe, key=bpe.get):
        vocab.setdefault(tok, len(vocab))
    if codes_above_text:
        for c in range(half, codebook_size):
            vocab[image_code_name(c)] = len(vocab)
    return vocab, len(head)


def _save_pure_tokenizer(path: Path, vocab: dict[str, int], specials: int, merges: list[str]) -> None:
    special_ids = set(range(specials)) | {i for t, i in vocab.items() if t.startswith("IMGIMG")}
    added = [_special_added_token(i, t) for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in special_ids]
    _write_bpe_tokenizer_json(path / "tokenizer.json", added, vocab, merges, PURE_UNK, _BYTE_LEVEL)
    _write_json(
        path / "tokenizer_config.json",
        {
            "bos_token": PURE_BOS,
            "eos_token": PURE_EOS,
            "pad_token": PURE_PAD,
            "unk_token": PURE_UNK,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1000000000000000019884624838656,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )


def build_upstream_chameleon(spec=None, vocab_size: int = 0, seed: int = 0):
    """A stock transformers ``ChameleonForConditionalGeneration`` of the tiny PURE shape, its query/key norms equal
    across the heads of each shard (``model_parallel_size`` 1): the model a published checkpoint is the weights of."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from vlcot_grpo.models.tiny import TINY_CHAMELEON_VQ, TinyPureSpec

    spec = spec or TinyPureSpec()
    config = ChameleonConfig(
        vocab_size=vocab_size,
        **spec.lm_fields(),
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        vocabulary_map={},
        vq_config=TINY_CHAMELEON_VQ,
    )
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_norm." in name and "self_attn" in name:
                param.copy_((1 + 0.1 * torch.randn(param.shape[-1])).expand_as(param) if name.endswith("weight")
                            else (0.1 * torch.randn(param.shape[-1])).expand_as(param))  # fmt: skip
    return model


def save_pure_lookalike(path: str | Path, spec=None, variant: str = "pure", bpe_vocab_size: int = 400) -> Path:
    """A tiny PURE (``variant="pure"``) or Lumina-mGPT base (``"lumina"``: half the codes named) saved as published:
    ``path/model`` (the checkpoint folder) and ``path/vq_ds8_c2i.pt``. ``vlcot-grpo convert`` turns it into a
    ``PureForConditionalGeneration`` folder. Returns ``path``."""
    import argparse

    from safetensors.torch import save_file

    from vlcot_grpo.models.tiny import TinyPureSpec

    spec = spec or TinyPureSpec()
    path = Path(path)
    folder = path / "model"
    folder.mkdir(parents=True, exist_ok=True)
    bpe, merges = _emu3_bpe(bpe_vocab_size)
    vocab, specials = pure_vocabulary(spec.codebook_size, bpe, variant == "pure", spec.max_size_units)
    _save_pure_tokenizer(folder, vocab, specials, merges)
    model = build_upstream_chameleon(spec, len(vocab), spec.seed)
    state = {}
    for key, tensor in model.state_dict().items():
        if "self_attn" in key and "_norm." in key:
            tensor = tensor[:1]  # one shard: (model_parallel_size, head_dim)
        state[key] = tensor.contiguous()
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": {}}
    for n, part in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in part}, folder / name, metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in part})
    _write_json(folder / "model.safetensors.index.json", index)
    config = model.config.to_dict()
    config.update(
        architectures=["ChameleonXLLMXForConditionalGeneration"],
        model_parallel_size=1,
        mask_image_logits=False,
        z_loss_weight=1e-5,
        vocabulary_map=vocab,
    )
    _write_json(folder / "config.json", config)
    shapes = llamagen_vq_shapes(
        spec.vq_base_channels, spec.vq_channel_multiplier, 1, spec.vq_latent_channels, spec.codebook_size,
        spec.vq_embed_dim,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(spec.seed + 1)
    vq = {k: 0.05 * torch.randn(s, generator=generator) for k, s in shapes.items()}
    for k in vq:
        if ".norm" in k and k.endswith(".weight"):
            vq[k] = vq[k] + 1.0
    vq["quantize.codebook_used"] = torch.zeros(65536)
    options = argparse.Namespace(vq_model="VQ-8", codebook_size=spec.codebook_size)
    torch.save({"model": vq, "steps": 1, "args": options}, path / "vq_ds8_c2i.pt")
    return path


LOOKALIKES["vlcot_pure"] = save_pure_lookalike


# ----- Janus / Janus-Pro ----------------------------------------------------------------------------------------------
# ``deepseek-community/Janus-Pro-1B`` (and -7B, Janus-1.3B) is published in transformers' own format, written by
# transformers' ``models/janus/convert_janus_weights_to_hf.py`` (facts read from it, not its code):
#
# * config: ``JanusConfig`` with a ``LlamaConfig`` text config (the original ``language_config``'s vocabulary size
#   102400, widths and layers; pad/bos/eos ids from the tokenizer), a ``JanusVisionConfig`` and a
#   ``JanusVQVAEConfig`` (codebook 16384 of dimension 8; aligner and head widths), ``image_token_id`` = the id of
#   ``<image_placeholder>``; ``tie_word_embeddings`` left at JanusConfig's default;
# * generation config: temperature 1, ``guidance_scale`` 5, ``pad_token_id`` = ``<｜▁pad▁｜>``, ``boi_token_id`` =
#   ``<begin_of_image>``;
# * tokenizer: DeepSeek's byte-level BPE loaded from ``tokenizer.json`` with the extra special tokens
#   ``image_token`` ``<image_placeholder>``, ``boi_token`` ``<begin_of_image>``, ``eoi_token`` ``<end_of_image>``;
#   its chat template writes ``<|User|>: …\n\n<|Assistant|>:``; a ``JanusProcessor`` is saved beside it.
#
# DeepSeek's tokenizer puts ``<｜begin▁of▁sentence｜>`` (bos) at 100000 and ``<｜▁pad▁｜>`` at 100002 and pads on the
# left; the text table has more rows (102400) than the tokenizer has ids. The look-alike keeps that order (BPE, then
# bos, eos, pad, then the role and image tokens) and the unused rows; the other specials' exact ids are not copied.
JANUS_BOS, JANUS_EOS, JANUS_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"


def janus_special_tokens() -> list[str]:
    """The look-alike's special tokens in id order (after the BPE)."""
    from vlcot_grpo.models.tiny import JANUS_SPECIALS

    return [JANUS_BOS, JANUS_EOS, JANUS_PAD, *JANUS_SPECIALS]


def _save_janus_tokenizer(path: Path, bpe_vocab_size: int):
    """Write a Janus-like tokenizer to ``path`` and load it back (as ``from_pretrained`` sees it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab, merges = _emu3_bpe(bpe_vocab_size)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=JANUS_BOS,
        eos_token=JANUS_EOS,
        pad_token=JANUS_PAD,
        padding_side="left",
        extra_special_tokens={
            "image_token": "<image_placeholder>",
            "boi_token": "<begin_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in janus_special_tokens()], special_tokens=True
    )
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def save_janus_lookalike(path: str | Path, spec=None, bpe_vocab_size: int = 400, text_rows: int | None = None) -> Path:
    """A tiny Janus saved as ``deepseek-community/Janus-Pro-1B`` is published (see above): the stock
    ``JanusForConditionalGeneration``, no VLCoT tags, more text rows than tokenizer ids."""
    from dataclasses import replace

    from transformers import GenerationConfig, JanusForConditionalGeneration

    from vlcot_grpo.models.tiny import TinyJanusSpec, build_janus_model, tiny_janus_config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _save_janus_tokenizer(path, bpe_vocab_size)
    spec = spec or TinyJanusSpec()
    spec = replace(spec, vocab_size=text_rows or len(tokenizer) + 64)
    config = tiny_janus_config(spec, tokenizer)
    config.tie_word_embeddings = type(config)().tie_word_embeddings  # the converter leaves JanusConfig's default
    model = build_janus_model(config, spec.seed, cls=JanusForConditionalGeneration)
    model.generation_config = GenerationConfig(
        temperature=1.0,
        guidance_scale=5,
        pad_token_id=tokenizer.convert_tokens_to_ids(JANUS_PAD),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        boi_token_id=tokenizer.convert_tokens_to_ids("<begin_of_image>"),
    )
    model.save_pretrained(path, max_shard_size=LOOKALIKE_SHARD_SIZE)
    return path


LOOKALIKES["janus"] = save_janus_lookalike
