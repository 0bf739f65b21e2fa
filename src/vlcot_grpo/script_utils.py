"""What the two training scripts (``sft.py`` and ``grpo.py``) share: the data arguments, loading the model and the
dataset, the default LoRA targets, and resuming from a checkpoint. Every error names the path or field at fault."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from vlcot_grpo.vlcot import DEFAULT_PROMPT, IMAGE_PLACEHOLDER

logger = logging.getLogger("vlcot_grpo")


@dataclass
class SharedScriptArguments:
    """What to train on, and the tiny offline model of the demo and tests."""

    dataset_name: str = field(
        default="demo",
        metadata={"help": "'demo' (bundled photos, built offline) or a folder written by `vlcot-grpo prepare-data`."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split, when the folder holds a DatasetDict."})
    demo_hr_size: int = field(default=64, metadata={"help": "HR side (pixels) of the demo dataset."})
    demo_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the demo dataset's degradations. Kept apart from the training seed so that the cold "
            "start and GRPO see the same low-quality inputs."
        },
    )
    build_tiny_model: bool = field(
        default=False,
        metadata={
            "help": "Build the tiny offline Emu3 at model_name_or_path if nothing is there, or rebuild it there if "
            "it was built from another tiny_model_spec (demo, tests)."
        },
    )
    tiny_model_spec: dict | str | None = field(
        default=None,
        metadata={
            "help": "Fields of vlcot_grpo.models.tiny.TinyEmu3Spec for build_tiny_model, e.g. "
            "{hidden_size: 128, num_hidden_layers: 4}; unset fields keep their defaults."
        },
    )


def load_policy(model_args, training_args, data_args):
    """The model and tokenizer at ``model_args.model_name_or_path`` (built first when it is the tiny model)."""
    import torch
    from transformers import AutoTokenizer

    from vlcot_grpo.models import load_model

    path = model_args.model_name_or_path
    if not path:
        raise ValueError("model_name_or_path is required (a checkpoint folder or hub id)")
    if data_args.build_tiny_model:
        _ensure_tiny_model(path, data_args.tiny_model_spec, training_args)
    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name (float32, bfloat16, float16) or 'auto'")
        dtype = getattr(torch, dtype)
    kwargs = getattr(training_args, "model_init_kwargs", None) or {}
    kwargs = dict(json.loads(kwargs) if isinstance(kwargs, str) else kwargs)
    kwargs.update(dtype=dtype, attn_implementation=model_args.attn_implementation)
    model = load_model(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _ensure_tiny_model(path: str, spec_fields, training_args) -> None:
    from vlcot_grpo.models.tiny import SPEC_FILE, TinyEmu3Spec, ensure_tiny_emu3

    # The spec is checked first, by every process: a malformed one is an error even beside a real checkpoint, and
    # raised inside the wait below it would leave the other processes waiting.
    fields = json.loads(spec_fields) if isinstance(spec_fields, str) else dict(spec_fields or {})
    try:
        spec = TinyEmu3Spec(**fields)
    except TypeError as err:
        raise ValueError(f"tiny_model_spec {fields}: {err} (the fields are those of TinyEmu3Spec)") from None
    # One writer, the others wait; they look at the folder only afterwards: one that exists without the spec file
    # may be the main process's half-written model, not a real checkpoint.
    with training_args.main_process_first(desc="build the tiny model"):
        if Path(path).exists() and not (Path(path) / SPEC_FILE).exists():
            return  # a real checkpoint: never overwritten
        ensure_tiny_emu3(path, spec)


def load_train_dataset(data_args: SharedScriptArguments, training_args):
    """The VLCoT training dataset: the demo (built for the config's stage sizes) or a prepared folder. A
    ``prompt_template`` other than the paper's wording replaces the dataset's ``prompt`` column."""
    dataset = _load_vlcot_dataset(data_args, training_args)
    template = getattr(training_args, "prompt_template", DEFAULT_PROMPT)
    if template != DEFAULT_PROMPT:
        if IMAGE_PLACEHOLDER not in template:
            raise ValueError(f"prompt_template must contain {IMAGE_PLACEHOLDER!r}: {template[:200]!r}")
        if "prompt" in dataset.column_names:
            dataset = dataset.remove_columns("prompt")
        dataset = dataset.add_column("prompt", [template] * len(dataset))
    return dataset


def _load_vlcot_dataset(data_args: SharedScriptArguments, training_args):
    import datasets

    if data_args.dataset_name == "demo":
        from vlcot_grpo.data.demo import build_demo_dataset

        return build_demo_dataset(
            hr_size=data_args.demo_hr_size, stage_sizes=training_args.stage_sizes, seed=data_args.demo_seed
        )
    path = Path(data_args.dataset_name)
    if not path.exists():
        raise FileNotFoundError(
            f"dataset_name {data_args.dataset_name!r} is neither 'demo' nor an existing folder; "
            "build one with `vlcot-grpo prepare-data --hr-dir DIR --out DIR`"
        )
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if data_args.dataset_train_split not in loaded:
            raise KeyError(f"{path}: no split {data_args.dataset_train_split!r}; it has {list(loaded)}")
        loaded = loaded[data_args.dataset_train_split]
    from vlcot_grpo.data.relabel import upgrade_labels

    # A dataset labelled by an older version gets its degradation levels recomputed (with a warning).
    return upgrade_labels(loaded, name=f"dataset {str(path)!r}")


def peft_config_for(model_args, model):
    """TRL's LoRA config from ``ModelConfig``, or None without ``use_peft``. Without ``lora_target_modules``, the
    backend's default: the language model's projections, never the VQ model's (which has q/k/v too)."""
    if not model_args.use_peft:
        return None
    from trl import get_peft_config

    from vlcot_grpo.models import BACKENDS

    if not model_args.lora_target_modules:
        model_args.lora_target_modules = BACKENDS[model.config.model_type].lora_target_modules
    return get_peft_config(model_args)


def log_distribution(trainer) -> None:
    """One log line saying how the trainer is distributed (the launch tests look for "deepspeed: True")."""
    logger.info(
        "distributed: %s, processes: %d, deepspeed: %s",
        trainer.accelerator.distributed_type,
        trainer.accelerator.num_processes,
        trainer.is_deepspeed_enabled,
    )


def resume_checkpoint(training_args) -> str | None:
    """``resume_from_checkpoint`` resolved: a path, or ``true``/``last`` = the newest checkpoint in output_dir."""
    value = training_args.resume_from_checkpoint
    if value in (None, "", "false", "False"):
        return None
    if str(value).lower() in ("true", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        out = Path(training_args.output_dir)
        last = get_last_checkpoint(str(out)) if out.exists() else None
        if last is None:
            logger.warning("resume_from_checkpoint=%s but %s has no checkpoint: starting fresh", value, out)
        return last
    if not Path(value).exists():
        raise FileNotFoundError(f"resume_from_checkpoint: {value} does not exist")
    return value
