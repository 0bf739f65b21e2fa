"""Preparing a real checkpoint, once: the 14 VLCoT tags become single tokens of its tokenizer and model.

    vlcot-grpo prepare --model SRC --out DST [--new-tokens] [--revision REV] [--overwrite]

``SRC`` is a downloaded checkpoint folder (or a hub id, fetched with ``huggingface_hub``); ``DST`` is written like
any checkpoint (``from_pretrained`` loads it) and is what the SFT recipe trains from. How the tags get their ids
depends on the family (``ImageTokenBackend.reserved_tag_tokens``):

* re-purposed reserved tokens (Emu3: ``<|extra_1|>`` … ``<|extra_14|>``): the tokens are renamed in the tokenizer
  (and the config's ``vocabulary_map``) at the same ids; no weight changes shape;
* new special tokens (families without reserved tokens, or ``--new-tokens``): appended to the vocabulary, the input
  embedding and the output head resized.

Either way each tag's row, in the input embedding and in the output head, starts as the mean of the rows of the
pieces the tag's text tokenised into before preparation (``<rough_image>`` -> ``<``, ``rough``, ``_image``, ``>``):
the model first reads and writes a tag roughly as it read its spelling. Every other weight and every other token's
id is left as it was. ``DST/vlcot_tokens.json`` records what was done. A checkpoint that already has the 14 tags as
single tokens (a prepared one, the tiny model) is left alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vlcot_grpo.vlcot import TAGS

#: Written next to a prepared checkpoint: how its tags got their ids.
RECORD_FILE = "vlcot_tokens.json"
#: Files a checkpoint folder keeps that preparation rewrites (weights, config, tokenizer); everything else in the
#: source folder (processor and image-processor configs, chat template, licence, ...) is copied unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_REWRITTEN = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
}


@dataclass
class TagTokens:
    """What preparation did: ``how`` is "repurposed", "added" or "present" (nothing to do)."""

    how: str
    ids: dict[str, int]
    #: tag -> the reserved token whose id it took ("repurposed")
    replaced: dict[str, str] = field(default_factory=dict)
    #: tag -> ids of the pieces its text tokenised into before, whose mean row initialised it
    pieces: dict[str, list[int]] = field(default_factory=dict)
    #: whether the embeddings grew ("added"); false where the new ids fit in unused rows (Janus-Pro's text table)
    resized: bool = False


def _single_token_id(tokenizer, text: str) -> int | None:
    """The id ``text`` encodes to when it is one token of the vocabulary, else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        return None
    known = tokenizer.convert_tokens_to_ids(text)
    return int(ids[0]) if known == ids[0] else None


def check_vlcot_tokens(tokenizer) -> dict[str, int]:
    """The 14 tags' ids; a ValueError naming each tag that is not one token, alone and inside text, with its pieces."""
    ids, problems = {}, []
    for tag in TAGS:
        tag_id = _single_token_id(tokenizer, tag)
        in_text = tokenizer(f"a{tag}b {tag}.", add_special_tokens=False)["input_ids"]
        if tag_id is None or in_text.count(tag_id) != 2:
            pieces = tokenizer.convert_ids_to_tokens(tokenizer(tag, add_special_tokens=False)["input_ids"])
            problems.append(f"{tag!r} tokenises to {pieces}")
        else:
            ids[tag] = tag_id
    if problems:
        raise ValueError(
            "the VLCoT tags must each be one token, alone and inside text: " + "; ".join(problems) + ". Prepare the "
            "checkpoint with `vlcot-grpo prepare --model SRC --out DST` (vlcot_grpo.models.prepare_checkpoint)"
        )
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"two VLCoT tags share one token id: {ids}")
    return ids


def _role_token_ids(tokenizer) -> set[int]:
    """Ids with a role in the tokenizer (bos, eos, pad, unk, the processor's image tokens ...)."""
    return {int(i) for i in tokenizer.all_special_ids}


def _backend_class(model):
    from vlcot_grpo.models import BACKENDS, unwrap_model

    model_type = getattr(unwrap_model(model).config, "model_type", None)
    if model_type not in BACKENDS:
        raise ValueError(f"no image-token backend for model_type {model_type!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[model_type]


def _check_reserved(tokenizer, model, reserved: tuple[str, ...]) -> list[int]:
    """The ids of the reserved tokens to re-purpose, after checking they exist and have no use."""
    if len(reserved) != len(TAGS) or len(set(reserved)) != len(TAGS):
        raise ValueError(f"reserved_tag_tokens must name {len(TAGS)} distinct tokens, got {list(reserved)}")
    backend = _backend_class(model)(model, tokenizer)
    roles = _role_token_ids(tokenizer) | set(backend.layout_token_ids) | set(backend.code_token_ids.tolist())
    config_ids = set()
    for config in (model.config, model.config.get_text_config()):
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "image_token_id"):
            value = getattr(config, key, None)
            config_ids |= set(value if isinstance(value, list) else [value]) - {None}
    ids = []
    for token in reserved:
        token_id = _single_token_id(tokenizer, token)
        if token_id is None:
            raise ValueError(f"reserved token {token!r} is not a single token of this tokenizer: cannot re-purpose it")
        if token_id in roles or token_id in config_ids:
            raise ValueError(
                f"reserved token {token!r} (id {token_id}) has a role in this checkpoint: not re-purposed"
            )
        ids.append(token_id)
    return ids


def _rename_tokens(tokenizer, renames: dict[str, str]):
    """The tokenizer with tokens renamed at their ids (``old -> new``): edited in its saved files, loaded back."""
    from transformers import AutoTokenizer

    def rename_keys(mapping: dict) -> dict:
        return {renames.get(k, k): v for k, v in mapping.items()}

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        if not path.exists():
            raise ValueError(
                f"{type(tokenizer).__name__} saves no tokenizer.json: its reserved tokens cannot be renamed; "
                "prepare with --new-tokens"
            )
        state = json.loads(path.read_text())
        for entry in state.get("added_tokens", []):
            entry["content"] = renames.get(entry["content"], entry["content"])
        vocab = state.get("model", {}).get("vocab")
        if isinstance(vocab, dict):
            state["model"]["vocab"] = rename_keys(vocab)
        elif isinstance(vocab, list):  # Unigram: [piece, score] pairs
            state["model"]["vocab"] = [[renames.get(piece, piece), score] for piece, score in vocab]
        path.write_text(json.dumps(state, ensure_ascii=False))
        config_path = Path(tmp) / "tokenizer_config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text())
            for entry in config.get("added_tokens_decoder", {}).values():
                entry["content"] = renames.get(entry["content"], entry["content"])
            config_path.write_text(json.dumps(config, ensure_ascii=False))
        return AutoTokenizer.from_pretrained(tmp)


def _init_rows(model, ids: dict[str, int], pieces: dict[str, list[int]]) -> None:
    """Each tag's row of the input embedding and of the output head = the mean of its pieces' rows (float32 mean)."""
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:
        matrices.append(head.weight)
    with torch.no_grad():
        for weight in matrices:
            for tag, tag_id in ids.items():
                weight[tag_id] = weight[pieces[tag]].float().mean(0).to(weight.dtype)


def add_vlcot_tokens(model, tokenizer, new_tokens: bool = False):
    """Make the 14 VLCoT tags single tokens of ``tokenizer`` and ``model``: ``(model, tokenizer, TagTokens)``.

    The family's reserved tokens are re-purposed when its backend names them (``reserved_tag_tokens``) and
    ``new_tokens`` is false; otherwise the tags are added as special tokens and the embeddings resized. The model is
    changed in place; the tokenizer returned may be a new object. A tokenizer that already has every tag is left as
    it is (``how="present"``); one with only some of them is an error.
    """
    from tokenizers import AddedToken

    present = {tag: _single_token_id(tokenizer, tag) for tag in TAGS}
    if all(i is not None for i in present.values()):
        return model, tokenizer, TagTokens(how="present", ids=check_vlcot_tokens(tokenizer))
    if any(i is not None for i in present.values()):
        have = [t for t, i in present.items() if i is not None]
        raise ValueError(
            f"the tokenizer has some VLCoT tags as tokens ({have}) but not all {len(TAGS)}: it was prepared with "
            "another tag set; start from the original checkpoint"
        )
    pieces = {tag: list(tokenizer(tag, add_special_tokens=False)["input_ids"]) for tag in TAGS}
    reserved = None if new_tokens else _backend_class(model).reserved_tag_tokens
    vocabulary_map = getattr(model.config, "vocabulary_map", None)
    resized = False
    if reserved:
        reserved_ids = _check_reserved(tokenizer, model, reserved)
        renames = dict(zip(reserved, TAGS))
        tokenizer = _rename_tokens(tokenizer, renames)
        if vocabulary_map is not None:  # Emu3's copy of the vocabulary travels in its config
            model.config.vocabulary_map = {renames.get(k, k): v for k, v in vocabulary_map.items()}
        how, replaced = "repurposed", {tag: old for old, tag in renames.items()}
        expected = dict(zip(TAGS, reserved_ids))
    else:
        tokenizer.add_tokens([AddedToken(tag, special=True, normalized=False) for tag in TAGS], special_tokens=True)
        rows = model.get_input_embeddings().weight.shape[0]
        resized = len(tokenizer) > rows
        if resized:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        expected = {tag: int(tokenizer.convert_tokens_to_ids(tag)) for tag in TAGS}
        if vocabulary_map is not None:
            model.config.vocabulary_map = {**vocabulary_map, **expected}
        how, replaced = "added", {}
    ids = check_vlcot_tokens(tokenizer)
    if ids != expected:
        raise ValueError(f"after preparation the tags encode to {ids}, expected {expected}")
    _init_rows(model, ids, pieces)
    return model, tokenizer, TagTokens(how=how, ids=ids, replaced=replaced, pieces=pieces, resized=resized)


def _local_folder(src: str, revision: str | None) -> Path:
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or src.startswith((".", "/")) or src.count("/") != 1:
        raise FileNotFoundError(f"--model {src}: not a checkpoint folder (nor a hub id such as BAAI/Emu3-Gen-hf)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, revision=revision))
    except Exception as err:  # offline, unknown repo, no access: say which
        raise FileNotFoundError(
            f"--model {src}: not a local folder, and fetching it from the hub failed: {err}"
        ) from None


def prepare_checkpoint(
    src: str | Path, out: str | Path, new_tokens: bool = False, revision: str | None = None, overwrite: bool = False
) -> TagTokens:
    """Prepare the checkpoint at ``src`` (a folder or a hub id) into the folder ``out``; see the module docstring.
    Nothing is written when ``src`` already has the tags (``how="present"``): train from ``src`` itself."""
    from transformers import AutoTokenizer

    from vlcot_grpo.models import load_model

    source = _local_folder(str(src), revision)
    out = Path(out)
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the source folder: write the prepared checkpoint to a new folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    if not (source / "config.json").exists():
        raise FileNotFoundError(f"{source}: no config.json, not a transformers checkpoint folder")
    model = load_model(str(source), dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model, tokenizer, record = add_vlcot_tokens(model, tokenizer, new_tokens=new_tokens)
    if record.how == "present":
        return record
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for item in source.iterdir():  # processor configs, chat template, licence, ...
        if item.name.startswith(".") or item.name in _REWRITTEN or item.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if item.name.endswith(".index.json"):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / RECORD_FILE).write_text(json.dumps({"source": str(src), **asdict(record)}, indent=2))
    check_vlcot_tokens(AutoTokenizer.from_pretrained(out))  # as every later step will load it
    return record


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="Checkpoint folder (or hub id) to prepare.")
    parser.add_argument("--out", required=True, help="Folder for the prepared checkpoint (train from it).")
    parser.add_argument(
        "--new-tokens",
        action="store_true",
        help="Add the tags as new tokens (embeddings resized) even where the family has reserved tokens.",
    )
    parser.add_argument("--revision", default=None, help="Hub revision, when --model is a hub id.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out folder.")
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    try:
        record = prepare_checkpoint(args.model, args.out, args.new_tokens, args.revision, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    if record.how == "present":
        print(f"{args.model} already has the {len(TAGS)} VLCoT tags as single tokens: nothing written, train from it")
        return 0
    how = {
        "repurposed": "re-purposed reserved tokens",
        "added": "new tokens (embeddings resized)" if record.resized else "new tokens (in unused embedding rows)",
    }[record.how]
    first, last = min(record.ids.values()), max(record.ids.values())
    print(f"prepared {args.out}: the {len(TAGS)} VLCoT tags are {how}, ids {first}-{last} (see {RECORD_FILE})")
    return 0
