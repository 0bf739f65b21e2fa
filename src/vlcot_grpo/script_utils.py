"""What the two training scripts (``sft.py`` and ``grpo.py``) share: the data arguments, loading the model and the
dataset, the default LoRA targets, and resuming from a checkpoint. Every error names the path or field at fault."""

from __future__ import annotations

import json
import logging
import os
import sys
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
            "help": "Seed of the demo dataset's degradations, kept apart from the training seed (the demo's GRPO "
            "recipe sets it past the cold start's copies, so that GRPO trains on new low-quality inputs)."
        },
    )
    demo_degradations_per_image: int = field(
        default=1,
        metadata={
            "help": "Rows per demo photo, each with its own degradation (copy k as demo_seed + k would make it). "
            "A GRPO run at demo_seed n after a cold start with n copies trains on inputs the cold start never saw."
        },
    )
    build_tiny_model: bool = field(
        default=False,
        metadata={
            "help": "Build the tiny offline model (tiny_model_family) at model_name_or_path if nothing is there, or "
            "rebuild it there if it was built from another family or tiny_model_spec (demo, tests)."
        },
    )
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the base model (model_name_or_path as published), written into the adapter's "
            "adapter_config.json and the model card so that a pushed adapter loads anywhere. Unset: the base's "
            "absolute local path."
        },
    )
    tiny_model_family: str = field(
        default="emu3",
        metadata={
            "help": "Family of the tiny model for build_tiny_model: emu3, pure (Chameleon + LlamaGen VQ-8) or "
            "janus (Llama; image codes on their own table and head)."
        },
    )
    tiny_model_spec: dict | str | None = field(
        default=None,
        metadata={
            "help": "Fields of vlcot_grpo.models.tiny.TinyEmu3Spec (TinyPureSpec, TinyJanusSpec for the others) for "
            "build_tiny_model, e.g. "
            "{hidden_size: 128, num_hidden_layers: 4}; unset fields keep their defaults."
        },
    )


#: TRL ``ModelConfig`` fields that only matter with LoRA (``use_peft``), and those of 4-bit quantisation.
LORA_FIELDS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_parameters",
    "lora_modules_to_save",
    "lora_task_type",
    "use_rslora",
    "use_dora",
)
QUANT_4BIT_FIELDS = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")
#: Every ``ModelConfig`` field the scripts honour; any other one set to a non-default value is refused.
HONOURED_MODEL_FIELDS = frozenset(
    {
        "model_name_or_path",
        "model_revision",
        "dtype",
        "attn_implementation",
        "use_peft",
        "load_in_4bit",
        "load_in_8bit",
        *LORA_FIELDS,
        *QUANT_4BIT_FIELDS,
    }
)


def _default(f):
    import dataclasses

    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_model_args(model_args, training_args=None) -> None:
    """Refuse a ``ModelConfig`` the scripts would not honour as written, naming the field: a field they do not read,
    LoRA or 4-bit settings that would be ignored, or quantisation that cannot be done (without LoRA, under
    DeepSpeed, without bitsandbytes)."""
    import dataclasses

    set_fields = {
        f.name: getattr(model_args, f.name)
        for f in dataclasses.fields(model_args)
        if getattr(model_args, f.name) != _default(f)
    }
    for name, value in set_fields.items():
        if name not in HONOURED_MODEL_FIELDS:
            raise ValueError(f"{name}={value!r}: the VLCoT scripts do not honour this ModelConfig field; remove it")
    if not model_args.use_peft:
        for name in LORA_FIELDS:
            if name in set_fields:
                raise ValueError(
                    f"{name}={set_fields[name]!r} is a LoRA setting but use_peft is false: set use_peft: true or "
                    f"remove {name}"
                )
    if model_args.lora_task_type != "CAUSAL_LM":
        raise ValueError(
            f"lora_task_type={model_args.lora_task_type!r}: the VLCoT scripts train a causal LM (CAUSAL_LM)"
        )
    if not model_args.load_in_4bit:
        for name in QUANT_4BIT_FIELDS:
            if name in set_fields:
                raise ValueError(f"{name}={set_fields[name]!r} is a 4-bit setting but load_in_4bit is false")
    quantized = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit" if model_args.load_in_8bit else None
    if quantized is None:
        return
    if not model_args.use_peft:
        raise ValueError(
            f"{quantized}: a quantized base trains only through adapters (QLoRA): set use_peft: true, or drop "
            f"{quantized} for a full fine-tune"
        )
    deepspeed = training_args is not None and (
        getattr(training_args, "deepspeed", None) or getattr(training_args, "deepspeed_plugin", None) is not None
    )
    if deepspeed:
        raise ValueError(
            f"{quantized} under DeepSpeed is not supported by the VLCoT scripts (QLoRA runs on one process or "
            "DDP: accelerate_configs/ddp.yaml); drop one of them"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError(f"{quantized} needs bitsandbytes, which does not import here: {err}") from None


def quantization_config_for(model_args, backend_class):
    """The bitsandbytes config of ``model_args`` (TRL's ``get_quantization_config``) with the family's
    ``full_precision_modules`` kept unquantized, or None without ``load_in_4bit``/``load_in_8bit``."""
    import dataclasses

    import torch
    from trl import get_quantization_config

    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    dtype = model_args.dtype
    if dtype in (None, "auto"):  # the 4-bit compute dtype must be a real one
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    config = get_quantization_config(dataclasses.replace(model_args, dtype=dtype))
    config.llm_int8_skip_modules = list(backend_class.full_precision_modules) or None
    return config


def quantized_layer_types(model) -> dict[str, int]:
    """How many bitsandbytes 4-bit and 8-bit linear layers ``model`` has, by class name."""
    import bitsandbytes as bnb

    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def load_policy(model_args, training_args, data_args):
    """The model and tokenizer at ``model_args.model_name_or_path`` (built first when it is the tiny model), loaded as
    ``model_args`` says (revision, dtype, attention, 4-/8-bit quantisation). The checkpoint must have the VLCoT tags
    (``vlcot-grpo prepare``)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from vlcot_grpo.models import BACKENDS, check_vlcot_tokens, load_model

    check_model_args(model_args, training_args)
    path = model_args.model_name_or_path
    if not path:
        raise ValueError("model_name_or_path is required (a checkpoint folder or hub id)")
    if data_args.build_tiny_model:
        _ensure_tiny_model(path, data_args.tiny_model_family, data_args.tiny_model_spec, training_args)
    check_model_path(path)
    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name (float32, bfloat16, float16) or 'auto'")
        dtype = getattr(torch, dtype)
    revision = model_args.model_revision
    kwargs = getattr(training_args, "model_init_kwargs", None) or {}
    kwargs = dict(json.loads(kwargs) if isinstance(kwargs, str) else kwargs)
    kwargs.update(dtype=dtype, attn_implementation=model_args.attn_implementation, revision=revision)
    backend_class = BACKENDS.get(AutoConfig.from_pretrained(path, revision=revision).model_type)
    quantization = quantization_config_for(model_args, backend_class) if backend_class else None
    if quantization is not None:
        if "quantization_config" in kwargs:
            raise ValueError("quantization_config in model_init_kwargs and load_in_4bit/load_in_8bit: set one")
        kwargs["quantization_config"] = quantization
        device = training_args.device
        kwargs.setdefault("device_map", {"": device.index or 0} if device.type == "cuda" else None)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    try:  # before the weights are read: an unprepared checkpoint fails at once
        check_vlcot_tokens(tokenizer)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    model = load_model(path, **kwargs)
    # PEFT writes this into adapter_config.json: a relative path would load only from the folder training ran in
    # (the scripts put base_model_id there instead when it is set, after the trainer has used this one)
    model.name_or_path = model.config._name_or_path = str(Path(path).resolve()) if Path(path).is_dir() else path
    if quantization is not None:
        want = "Linear4bit" if model_args.load_in_4bit else "Linear8bitLt"
        found = quantized_layer_types(model)
        if not found.get(want):
            flag = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
            raise RuntimeError(f"{flag}: no layer of {path} was quantized ({found}): refusing a full-precision run")
        logger.info("quantized base (%s): %s", path, found)
    return model, tokenizer


def check_report_to(training_args) -> None:
    """``report_to: wandb`` without wandb installed: say how to install the extra, before any work (transformers
    says so only once the trainer is built, after the model has loaded)."""
    import importlib.util

    report_to = training_args.report_to or []
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            "report_to: wandb needs the W&B extra, which is not installed: pip install -e '.[wandb]' in a checkout "
            "(or pip install wandb); WANDB_MODE=offline logs without an account. Or drop wandb from report_to."
        )


def check_model_path(path: str) -> None:
    """A ``model_name_or_path`` that is no local folder gets a message saying so, not the Hub's "Repo id must be in
    the form 'repo_name' or 'namespace/repo_name'" (or, offline, a failed download)."""
    import os

    if Path(path).is_dir():
        return
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if Path(path).exists():
        raise NotADirectoryError(f"model_name_or_path {path!r} is a file; it must be a checkpoint folder or a Hub id")
    if looks_local:
        raise FileNotFoundError(f"model_name_or_path {path!r}: no such folder (a local path, not a Hub id)")
    if offline:
        raise FileNotFoundError(
            f"model_name_or_path {path!r}: no such local folder, and HF_HUB_OFFLINE is set, so it is not fetched as a "
            "Hub id either"
        )


def _ensure_tiny_model(path: str, family: str, spec_fields, training_args) -> None:
    from vlcot_grpo.models.tiny import SPEC_FILE, TINY_FAMILIES, ensure_tiny_model

    # The spec is checked first, by every process: a malformed one is an error even beside a real checkpoint, and
    # raised inside the wait below it would leave the other processes waiting.
    if family not in TINY_FAMILIES:
        raise ValueError(f"tiny_model_family {family!r}: expected one of {sorted(TINY_FAMILIES)}")
    spec_class = TINY_FAMILIES[family][0]
    fields = json.loads(spec_fields) if isinstance(spec_fields, str) else dict(spec_fields or {})
    try:
        spec = spec_class(**fields)
    except TypeError as err:
        raise ValueError(f"tiny_model_spec {fields}: {err} (the fields are those of {spec_class.__name__})") from None
    # One writer, the others wait; they look at the folder only afterwards: one that exists without the spec file
    # may be the main process's half-written model, not a real checkpoint.
    with training_args.main_process_first(desc="build the tiny model"):
        if Path(path).exists() and not (Path(path) / SPEC_FILE).exists():
            return  # a real checkpoint: never overwritten
        ensure_tiny_model(path, family, spec)


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
            hr_size=data_args.demo_hr_size,
            stage_sizes=training_args.stage_sizes,
            seed=data_args.demo_seed,
            degradations_per_image=data_args.demo_degradations_per_image,
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


def peft_config_for(model_args, model, tokenizer):
    """TRL's LoRA config from ``ModelConfig``, or None without ``use_peft``. Without ``lora_target_modules``, the
    backend's default: the language model's projections, never the VQ model's (which has q/k/v too). The 14 VLCoT
    tags' rows of the input embedding and of the output head train with the adapter (PEFT's
    ``trainable_token_indices``: saved in the adapter file, a few rows, not the matrices), unless
    ``lora_modules_to_save`` trains that whole layer."""
    if not model_args.use_peft:
        return None
    import dataclasses

    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled
    from trl import get_peft_config

    from vlcot_grpo.models import BACKENDS, load_backend

    if not model_args.lora_target_modules:
        model_args.lora_target_modules = BACKENDS[model.config.model_type].lora_target_modules
    config = get_peft_config(model_args)
    if is_deepspeed_zero3_enabled() and not torch.cuda.is_available():
        # peft 0.21's TrainableTokensLayer gathers the rows it starts from on CUDA only under ZeRO-3
        logger.warning(
            "ZeRO-3 without CUDA: PEFT's trainable tokens cannot start here, so the VLCoT tags' embedding and head "
            "rows stay frozen in this run (the LoRA adapters train as usual)"
        )
        return config
    tag_ids = sorted(load_backend(model, tokenizer).tag_ids.values())
    saved = set(model_args.lora_modules_to_save or [])
    layers = {}
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        name = next(n for n, m in model.named_modules() if m is layer)
        if name not in saved and name.rsplit(".", 1)[-1] not in saved:
            layers[name] = tag_ids
    return dataclasses.replace(config, trainable_token_indices=layers or None)


@dataclass
class ScriptRun:
    """One run of a training script: the command line, the three argument dataclasses TRL's parser made, the
    training dataset and the checkpoint to resume from (None: start afresh)."""

    argv: list[str]
    script_args: SharedScriptArguments
    training_args: object
    model_args: object
    dataset: object = None
    resume: str | None = None


def start_run(argv, parse_args) -> ScriptRun:
    """What both scripts do before loading the model: parse (``sys.argv`` when ``argv`` is None), set up logging,
    check ``report_to``, load the dataset, find the checkpoint to resume from. A bad dataset, recipe or checkpoint
    path fails here, in seconds."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    run = ScriptRun(argv, *parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_report_to(run.training_args)
    run.dataset = load_train_dataset(run.script_args, run.training_args)
    run.resume = resume_checkpoint(run.training_args)
    return run


def make_trainer(trainer_class, method: str, run: ScriptRun, model, tokenizer, **kwargs):
    """The script's trainer on ``model`` (LoRA from the model arguments), with the run recorded for its model card
    and ``vlcot_settings.json``."""
    trainer = trainer_class(
        model=model,
        args=run.training_args,
        train_dataset=run.dataset,
        processing_class=tokenizer,
        peft_config=peft_config_for(run.model_args, model, tokenizer),
        **kwargs,
    )
    record_run(trainer, method, model, run)
    log_distribution(trainer)
    return trainer


def record_run(trainer, method: str, model, run: ScriptRun) -> None:
    """Give the trainer what its model card and ``vlcot_settings.json`` say (``model`` is the base as loaded), and
    point the adapter at ``base_model_id`` when one is set."""
    from vlcot_grpo.saved_settings import training_settings

    trainer.vlcot_settings = training_settings(
        method, model, run.script_args, run.training_args, run.model_args, run.argv, dataset=run.dataset
    )
    if run.script_args.base_model_id and hasattr(trainer.model, "peft_config"):
        for config in trainer.model.peft_config.values():
            config.base_model_name_or_path = run.script_args.base_model_id


def save_run_record(trainer, folder, adapter: bool | None = None) -> None:
    """Write ``vlcot_settings.json`` (with the final metrics) and the model card into ``folder``."""
    from vlcot_grpo.card import write_model_card
    from vlcot_grpo.saved_settings import final_metrics, write_settings

    settings = dict(trainer.vlcot_settings)
    if adapter is not None:
        settings["adapter"] = adapter
    metrics = final_metrics(trainer.state.log_history)
    write_settings(folder, {**settings, "metrics": metrics})
    write_model_card(folder, settings, metrics, trainer.card_hub_id())


def log_distribution(trainer) -> None:
    """One log line saying how the trainer is distributed (the launch tests look for "deepspeed: True")."""
    logger.info(
        "distributed: %s, processes: %d, deepspeed: %s",
        trainer.accelerator.distributed_type,
        trainer.accelerator.num_processes,
        trainer.is_deepspeed_enabled,
    )


def resume_checkpoint(training_args) -> str | None:
    """``resume_from_checkpoint`` resolved: a path, or ``true``/``last`` = the newest *complete* checkpoint in
    output_dir (``checkpoint_is_complete``); newer incomplete ones are skipped with a warning naming them."""
    value = training_args.resume_from_checkpoint
    if value in (None, "", "false", "False"):
        return None
    if str(value).lower() in ("true", "last"):
        out = Path(training_args.output_dir)
        found = (
            sorted(
                (p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                key=lambda p: int(p.name.split("-")[-1]),
                reverse=True,
            )
            if out.is_dir()
            else []
        )
        for checkpoint in found:
            if checkpoint_is_complete(checkpoint):
                return str(checkpoint)
            logger.warning(
                "resume_from_checkpoint=%s: skipping %s, which is incomplete (no readable %s: the run was probably "
                "stopped while saving it)",
                value,
                checkpoint,
                TRAINER_STATE,
            )
        logger.warning("resume_from_checkpoint=%s but %s has no complete checkpoint: starting fresh", value, out)
        return None
    if not Path(value).exists():
        raise FileNotFoundError(f"resume_from_checkpoint: {value} does not exist")
    if not checkpoint_is_complete(Path(value)):
        raise ValueError(f"resume_from_checkpoint: {value} is incomplete (no readable {TRAINER_STATE})")
    return value


#: transformers' Trainer writes this last when it saves a checkpoint (after the weights, optimizer, scheduler and
#: RNG states), so a checkpoint is complete when it is there and parses
TRAINER_STATE = "trainer_state.json"


def checkpoint_is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint whose save finished: its trainer state is there and is valid JSON."""
    try:
        json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True
