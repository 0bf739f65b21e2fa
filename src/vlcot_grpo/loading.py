"""``vlcot_grpo.load_pretrained``: a trained model, or a base with its adapter, in the family's own class.

``AutoModelForCausalLM`` (and so PEFT's ``AutoPeftModelForCausalLM``) loads Emu3 as a text-only model, on which a
VLCoT adapter then fails; this loader reads the family from the checkpoint's config instead, finds an adapter's
base in its ``adapter_config.json``, and refuses an adapter whose base weights are not the ones it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlcot_grpo.saved_settings import base_fingerprint, read_settings

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a local PEFT adapter folder (an adapter config, no model config)."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def adapter_base(adapter: str | Path) -> str:
    """The base model an adapter folder names (``base_model_name_or_path``)."""
    config = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path); pass base=")
    return base


def check_adapter_base(model, adapter: str | Path, base: str) -> None:
    """Refuse ``adapter`` on ``model`` when the adapter recorded a base fingerprint and this base's differs."""
    want = read_settings(adapter).get("base_model", {}).get("fingerprint") if Path(adapter).is_dir() else None
    if want is None:
        return  # an adapter not trained by vlcot-grpo: nothing to compare
    have = base_fingerprint(model)
    if have != want:
        trained_on = read_settings(adapter)["base_model"]
        raise ValueError(
            f"adapter {adapter} was trained on another base than {base}: its weights' fingerprint is {want} "
            f"(base {trained_on.get('hub_id') or trained_on.get('path')}), this base's is {have}. Load the base it "
            "was trained on (check_base=False / --ignore-base-mismatch to load it anyway)"
        )


def load_pretrained(
    path_or_id: str,
    adapter: str | None = None,
    *,
    base: str | None = None,
    dtype="auto",
    device: str | None = None,
    merge: bool = True,
    check_base: bool = True,
    revision: str | None = None,
):
    """``(model, tokenizer)`` for a checkpoint trained here: a full model folder or Hub id, an adapter folder (its
    base is read from its ``adapter_config.json``, or given as ``base``), or a base plus ``adapter``. The adapter is
    merged unless ``merge=False`` (then a ``PeftModel``). ``dtype`` is a torch dtype, its name, or "auto"."""
    import torch
    from transformers import AutoTokenizer

    from vlcot_grpo.models import load_model

    if adapter is None and is_adapter(path_or_id):
        adapter, path_or_id = path_or_id, base or adapter_base(path_or_id)
    elif base is not None:
        raise ValueError("base= is for an adapter folder given as path_or_id; with adapter=, path_or_id is the base")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter {adapter}: no such folder")
    if adapter is not None and not (Path(adapter) / ADAPTER_CONFIG).is_file():
        raise ValueError(f"adapter {adapter} has no {ADAPTER_CONFIG}: it is not a PEFT adapter folder")
    if Path(path_or_id).is_dir() and not (Path(path_or_id) / "config.json").is_file():
        raise ValueError(f"{path_or_id} has no config.json: neither a model checkpoint nor (without it) an adapter")
    kwargs = {"dtype": dtype} | ({"revision": revision} if revision else {})
    model = load_model(str(path_or_id), **kwargs)
    if adapter is not None:
        from peft import PeftModel

        if check_base:
            check_adapter_base(model, adapter, str(path_or_id))
        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    if device is not None:
        model = model.to(device)
    has_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter) if has_tokenizer else str(path_or_id))
    return model.eval(), tokenizer
