"""Converting the paper's published checkpoints into one folder this project loads like any other.

    vlcot-grpo convert --model PURE_DIR --vq vq_ds8_c2i.pt --out models/pure [--text-tokenizer FILE] [--overwrite]

``PURE_DIR`` is a Lumina-mGPT or PURE checkpoint folder as published on the Hub (``nonwhy/PURE``,
``Alpha-VLLM/Lumina-mGPT-7B-512``): ``config.json`` (model_type ``chameleon``), the weights (``*.safetensors`` or
``*.bin``) and the tokenizer files. ``vq_ds8_c2i.pt`` is LlamaGen's VQ-8 (``FoundationVision/LlamaGen``), the image
tokenizer PURE loads (``pure/model/chameleon_vae_ori/image_tokenizer.py``). The output is a
``PureForConditionalGeneration`` folder (``vlcot_grpo.models.pure``); ``vlcot-grpo prepare`` then adds the tags.

What is read, and how (facts from the upstream sources, not their code):

* Language model: transformers' Chameleon key names (``model.embed_tokens``, ``model.layers.N.self_attn.*``,
  ``model.norm``, ``lm_head``). The copy PURE and Lumina-mGPT ship (``pure/model/chameleon/modeling_chameleon.py``)
  stores the per-head query/key LayerNorms as ``(model_parallel_size, head_dim)`` and repeats each row over the heads
  of its shard; transformers 5 stores ``(heads, head_dim)``: the rows are repeated here once. ``model.vqmodel.*``
  (Chameleon's own VQGAN, which this family does not use) is dropped.
* Image codes: the tokenizer's ``IMGIMG`` names (``vlcot_grpo.models.pure.code_of_name``); ``--text-tokenizer``
  (PURE's ``pure/tokenizer/text_tokenizer.json``) supplies them when the folder's tokenizer lacks some. A Lumina-mGPT
  base names only Chameleon's 8192 image slots: codes 8192-16383 are then added at ids 65536-73727 (PURE's layout),
  in the tokenizer and as new rows of the input embedding and the head, each initialised to the mean of the 8192
  existing code rows (so a new code starts as the model's average image code, not as noise).
* VQ model: LlamaGen's ``VQModel`` state dict (``checkpoint["model"]``, as PURE loads it; else ``"ema"`` or
  ``"state_dict"``), read with ``torch.load(weights_only=True)``. Its keys map one to one onto transformers'
  ``JanusVQVAE`` (``encoder.conv_blocks.I.res.J`` -> ``encoder.down.I.block.J``, ``mid.0/1/2`` ->
  ``mid.block_1/attn_1/block_2``, the decoder likewise with ``up``); ``quantize.codebook_used`` (a training
  statistic) is dropped. The shape (codebook, code size, widths, stages) is read from the tensors.

Every expected key is checked before anything is written: missing, unexpected and misshapen keys are named.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

#: LlamaGen VQModel key -> transformers JanusVQVAE key (checked key by key against LlamaGen's ``vq_model.py``).
LLAMAGEN_TO_JANUS = (
    (r"^(encoder)\.conv_blocks\.(\d+)\.res\.", r"\1.down.\2.block."),
    (r"^(encoder)\.conv_blocks\.(\d+)\.", r"\1.down.\2."),
    (r"^(decoder)\.conv_blocks\.(\d+)\.res\.", r"\1.up.\2.block."),
    (r"^(decoder)\.conv_blocks\.(\d+)\.", r"\1.up.\2."),
    (r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.attn_1."),
    (r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2."),
)
DROPPED_VQ_KEYS = ("quantize.codebook_used",)
DROPPED_LM_PREFIX = "model.vqmodel."
#: Source config fields that describe the upstream code, not the model, and are not carried over.
_UPSTREAM_ONLY = {
    "architectures",
    "model_type",
    "vocabulary_map",
    "mask_image_logits",
    "z_loss_weight",
    "auto_map",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "vq_config",
}
RECORD_FILE = "vlcot_convert.json"
_NORM = re.compile(r"^model\.layers\.\d+\.self_attn\.(q|k)_norm\.(weight|bias)$")


class CheckpointError(ValueError):
    """A source checkpoint that cannot be converted; the message names the file and the keys."""


# ----- reading ------------------------------------------------------------------------------------------------------
def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder's ``*.safetensors`` (else ``*.bin`` / ``*.pt``) files, tensors only."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        loaded = [load_file(f) for f in files]
    else:
        files = sorted([*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")])
        if not files:
            raise CheckpointError(f"{folder}: no weight files (*.safetensors, *.bin, *.pt)")
        loaded = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    weights: dict[str, torch.Tensor] = {}
    for f, part in zip(files, loaded):
        doubled = sorted(set(part) & set(weights))
        if doubled:
            raise CheckpointError(f"{f}: keys also in another weight file of {folder}: {doubled[:5]}")
        weights.update(part)
    return weights


def read_vq_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """LlamaGen's VQ state dict from its ``.pt`` file (tensors only; LlamaGen's training script also pickles its
    ``argparse.Namespace`` of options, which is let through and ignored)."""
    if not path.is_file():
        raise CheckpointError(f"--vq {path}: no such file (LlamaGen's vq_ds8_c2i.pt)")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"--vq {path}: not a readable tensor checkpoint ({err})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"--vq {path}: expected a dict of tensors, got {type(checkpoint).__name__}")
    for key in ("model", "ema", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint
    raise CheckpointError(f"--vq {path}: no 'model', 'ema' or 'state_dict' entry (keys: {sorted(checkpoint)[:8]})")


def _janus_key(key: str) -> str:
    for pattern, replacement in LLAMAGEN_TO_JANUS:
        key = re.sub(pattern, replacement, key)
    return key


def vq_config_from_weights(state: dict[str, torch.Tensor], where: str):
    """The ``JanusVQVAEConfig`` of a LlamaGen VQ state dict, read from its tensor shapes."""
    from transformers import JanusVQVAEConfig

    try:
        codebook, code_dim = state["quantize.embedding.weight"].shape
        base = state["encoder.conv_in.weight"].shape[0]
        latent = state["encoder.conv_out.weight"].shape[0]
        levels = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
        multiplier = [state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // base for i in levels]
        blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.conv_blocks.0.res.")})
    except KeyError as err:
        raise CheckpointError(f"{where}: not a LlamaGen VQ state dict (no {err.args[0]!r})") from None
    return JanusVQVAEConfig(
        num_embeddings=int(codebook),
        embed_dim=int(code_dim),
        latent_channels=int(latent),
        base_channels=int(base),
        channel_multiplier=multiplier,
        num_res_blocks=blocks,
    )


def _expand_norm(key: str, tensor: torch.Tensor, heads: int, where: str) -> torch.Tensor:
    """(model_parallel_size, head_dim) -> (heads, head_dim), each shard's row over its heads; (heads, head_dim)
    as it is."""
    if tensor.dim() != 2:
        raise CheckpointError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected (shards, head_dim)")
    shards = tensor.shape[0]
    if shards == heads:
        return tensor
    if heads % shards:
        raise CheckpointError(f"{where}: {key} has {shards} rows, which do not divide the {heads} heads")
    return tensor.repeat_interleave(heads // shards, dim=0)


def check_keys(found: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str) -> None:
    """A CheckpointError naming every missing, unexpected and misshapen key, or nothing."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = [
        f"{k}: {tuple(found[k].shape)}, expected {tuple(expected[k])}"
        for k in sorted(set(found) & set(expected))
        if tuple(found[k].shape) != tuple(expected[k])
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if items:
            shown = ", ".join(items[:8]) + (f" (and {len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {label} key(s): {shown}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


# ----- codes and vocabulary -------------------------------------------------------------------------------------
def _names(tokenizer, text_tokenizer: Path | None) -> dict[str, int]:
    names = dict(tokenizer.get_vocab())
    if text_tokenizer is not None:
        data = json.loads(text_tokenizer.read_text())
        extra = dict(data.get("model", {}).get("vocab", {}))
        extra.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
        names.update({k: v for k, v in extra.items() if k.startswith("IMGIMG")})
    return names


def code_layout(names: dict[str, int], codebook: int, rows: int, where: str) -> tuple[dict[int, int], list[int]]:
    """(code -> id for every code, the codes to add as new ids). A Lumina-mGPT base names codes 0..codebook/2-1
    only: the rest go to ids ``rows`` onward."""
    from vlcot_grpo.models.pure import code_of_name

    ids: dict[int, int] = {}
    for name, token_id in names.items():
        code = code_of_name(name)
        if code is not None and code < codebook:
            ids[code] = int(token_id)
    if len(ids) == codebook:
        return ids, []
    half = codebook // 2
    if sorted(ids) == list(range(half)):
        added = list(range(half, codebook))
        ids.update({code: rows + i for i, code in enumerate(added)})
        return ids, added
    raise CheckpointError(
        f"{where}: the tokenizer names {len(ids)} of the VQ model's {codebook} image codes (IMGIMG…); expected all "
        f"of them (PURE; pass --text-tokenizer pure/tokenizer/text_tokenizer.json if the folder's tokenizer lacks "
        f"some) or exactly the first {half} (a Lumina-mGPT base)"
    )


def _name_codes(tokenizer, ids: dict[int, int], where: str):
    """Add a token for every code id the tokenizer does not name yet; they must come right after its last id."""
    from tokenizers import AddedToken

    from vlcot_grpo.models.pure import image_code_name

    have = {int(i) for i in tokenizer.get_vocab().values()}
    todo = sorted((token_id, code) for code, token_id in ids.items() if token_id not in have)
    if not todo:
        return tokenizer
    first = len(tokenizer)
    if [t for t, _ in todo] != list(range(first, first + len(todo))):
        raise CheckpointError(
            f"{where}: image-code ids {todo[0][0]}-{todo[-1][0]} are not named by the tokenizer and do not follow "
            f"its last id {first - 1}"
        )
    tokenizer.add_tokens(
        [AddedToken(image_code_name(c), special=True, normalized=False) for _, c in todo], special_tokens=True
    )
    return tokenizer


# ----- converting ---------------------------------------------------------------------------------------------------
def _lm_state_dict(weights, config, where):
    heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads or config.num_attention_heads}
    out = {}
    for key, tensor in weights.items():
        if key.startswith(DROPPED_LM_PREFIX):
            continue
        match = _NORM.match(key)
        out[key] = _expand_norm(key, tensor, heads[match[1]], where) if match else tensor
    return out


def _add_code_rows(state, added: int, code_ids: list[int]) -> None:
    """New rows of the input embedding and the head: each the mean of the existing code rows."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state:
            weight = state[key]
            mean = weight[code_ids].float().mean(0, keepdim=True).to(weight.dtype)
            state[key] = torch.cat([weight, mean.expand(added, -1)])


def _read_source_config(model_dir: Path, out: Path, overwrite: bool) -> dict:
    """Check ``model_dir`` and ``out`` and return the checkpoint's config.json (a Chameleon one)."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"--model {model_dir}: no config.json (a Lumina-mGPT or PURE checkpoint folder)")
    if out.exists() and not overwrite:
        raise CheckpointError(f"--out {out} exists; pass --overwrite to replace it")
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise CheckpointError(f"--out {out} is --model {model_dir} or inside it")
    source = json.loads(config_file.read_text())
    if source.get("model_type") != "chameleon":
        raise CheckpointError(f"{config_file}: model_type {source.get('model_type')!r}, expected 'chameleon'")
    return source


def _assemble_model(config, state, where: str):
    """A ``PureForConditionalGeneration`` built on the meta device holding exactly ``state``."""
    from vlcot_grpo.models.base import without_zero3_init
    from vlcot_grpo.models.pure import PureForConditionalGeneration

    with torch.device("meta"), without_zero3_init():
        model = PureForConditionalGeneration(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(state, expected, where)
    model.load_state_dict(state, strict=True, assign=True)
    model.config.dtype = state["lm_head.weight"].dtype
    return model


def _conversion_record(model_dir, vq_path, text_tokenizer, ids, added, codebook: int, weights) -> dict:
    """What ``RECORD_FILE`` says about a conversion: its inputs, the code ids and what was dropped."""
    half = codebook // 2
    return {
        "source": str(model_dir),
        "vq": str(vq_path),
        "text_tokenizer": str(text_tokenizer) if text_tokenizer else None,
        "codes_added": [added[0], added[-1]] if added else None,
        "code_ids": {
            "first_half": [ids[0], ids[half - 1]],
            "second_half": [ids[half], ids[codebook - 1]],
        },
        "dropped": [f"{DROPPED_LM_PREFIX}*"] if any(k.startswith(DROPPED_LM_PREFIX) for k in weights) else [],
    }


def _save_folder(model, tokenizer, record: dict, out: Path) -> None:
    """Save into a staging folder next to ``out``, then move it into place (replacing ``out``)."""
    staging = out.parent / f".{out.name}.converting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging, max_shard_size="5GB")
    tokenizer.save_pretrained(staging)
    (staging / RECORD_FILE).write_text(json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


def convert_checkpoint(model_dir, vq_path, out, text_tokenizer=None, overwrite: bool = False) -> Path:
    """Write the ``PureForConditionalGeneration`` folder ``out`` from a Lumina-mGPT / PURE folder and LlamaGen's
    VQ file; see the module docstring. Returns ``out``."""
    from transformers import AutoTokenizer

    from vlcot_grpo.models.pure import PureConfig, code_ids_from_vocab

    model_dir, vq_path, out = Path(model_dir), Path(vq_path), Path(out)
    text_tokenizer = Path(text_tokenizer) if text_tokenizer else None
    source = _read_source_config(model_dir, out, overwrite)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vq_state = read_vq_state_dict(vq_path)
    vq_config = vq_config_from_weights(vq_state, str(vq_path))
    vq_weights = {_janus_key(k): v for k, v in vq_state.items() if k not in DROPPED_VQ_KEYS}

    weights = read_weights(model_dir)
    if "lm_head.weight" not in weights:
        raise CheckpointError(f"{model_dir}: no lm_head.weight among the weights ({len(weights)} keys)")
    rows = int(weights["lm_head.weight"].shape[0])
    codebook = vq_config.num_embeddings
    ids, added = code_layout(_names(tokenizer, text_tokenizer), codebook, rows, str(model_dir))
    tokenizer = _name_codes(tokenizer, ids, str(model_dir))
    code_ids_from_vocab(tokenizer.get_vocab(), codebook, str(model_dir))  # the backend's reading

    fields = {k: v for k, v in source.items() if k not in _UPSTREAM_ONLY}
    config = PureConfig(
        **{**fields, "vocab_size": rows + len(added)},
        vocabulary_map={},
        image_tokenizer_config=vq_config.to_dict(),
    )
    state = _lm_state_dict(weights, config, str(model_dir))
    if added:
        _add_code_rows(state, len(added), [ids[c] for c in range(codebook // 2)])
    state.update({f"image_tokenizer.{k}": v for k, v in vq_weights.items()})
    model = _assemble_model(config, state, f"{model_dir} + {vq_path}")

    record = _conversion_record(model_dir, vq_path, text_tokenizer, ids, added, codebook, weights)
    _save_folder(model, tokenizer, record, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlcot-grpo convert",
        description="Turn a Lumina-mGPT / PURE checkpoint folder and LlamaGen's vq_ds8_c2i.pt into one folder this "
        "project loads (then: vlcot-grpo prepare).",
    )
    parser.add_argument("--model", required=True, help="Lumina-mGPT or PURE checkpoint folder (config.json, weights).")
    parser.add_argument("--vq", required=True, help="LlamaGen's VQ-8 file, vq_ds8_c2i.pt.")
    parser.add_argument("--out", required=True, help="Folder to write.")
    parser.add_argument(
        "--text-tokenizer",
        default=None,
        help="PURE's pure/tokenizer/text_tokenizer.json: the image codes' names when the folder's tokenizer lacks some.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = convert_checkpoint(args.model, args.vq, args.out, args.text_tokenizer, args.overwrite)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"vlcot-grpo convert: error: {err}", file=sys.stderr)
        return 2
    print(f"converted: {out}\nnext: vlcot-grpo prepare --model {out} --out {out}-vlcot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
