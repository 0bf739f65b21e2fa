"""What a training run saves next to its model or adapter so that inference knows it: ``vlcot_settings.json``.

``upscale`` reads its defaults from it (LR and stage sizes, prompt, sampling), the model card is written from it,
and an adapter records a fingerprint of the base weights it was trained on, so that loading it on another base is
an error instead of garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SETTINGS_FILE = "vlcot_settings.json"
#: bumped when a field changes meaning; readers accept this version and older ones
SETTINGS_VERSION = 1
#: the sampling keys upscale can take from the file, with the RolloutConfig field each sets
SAMPLING_KEYS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "image_temperature",
    "image_top_k",
    "guidance_scale",
    "max_new_tokens",
)


def base_fingerprint(model) -> str:
    """A short hash of weights no 4-/8-bit quantisation touches and any fine-tune changes: strided rows of the input
    embedding and every 1-D floating parameter (norms, biases), rounded to bfloat16 so that the same base loaded in
    float32 or bfloat16 gives the same hash."""
    import torch

    digest = hashlib.sha256()
    embedding = model.get_input_embeddings().weight.detach()
    rows = torch.arange(0, embedding.shape[0], max(1, embedding.shape[0] // 256), device=embedding.device)
    tensors = [("embedding", embedding[rows])]
    tensors += [(n, p.detach()) for n, p in model.named_parameters() if p.dim() == 1 and p.is_floating_point()]
    for name, tensor in tensors:
        if "lora_" in name or "trainable_tokens" in name:
            continue  # adapter weights are not the base's
        digest.update(name.removeprefix("base_model.model.").encode())
        digest.update(tensor.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def read_settings(folder: str | Path | None) -> dict:
    """The settings saved in ``folder``, or {} when there are none (a checkpoint not trained here)."""
    if folder is None:
        return {}
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(settings, dict) or settings.get("version", 0) > SETTINGS_VERSION:
        raise ValueError(f"{path}: not a settings file this version of vlcot-grpo reads")
    return settings


def write_settings(folder: str | Path, settings: dict) -> Path:
    path = Path(folder) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": SETTINGS_VERSION, **settings}, indent=2, default=str) + "\n")
    return path


def _recipe(argv: list[str]) -> dict:
    """The recipe file's text and the command-line overrides after it."""
    argv = list(argv or [])
    if "--config" in argv:
        i = argv.index("--config")
        path = argv[i + 1]
        return {"file": path, "text": Path(path).read_text(), "overrides": argv[:i] + argv[i + 2 :]}
    return {"file": None, "text": None, "overrides": argv}


def _public_module(cls) -> str:
    """``transformers`` when the class is exported there, else its own module."""
    import transformers

    return "transformers" if getattr(transformers, cls.__name__, None) is cls else cls.__module__


#: the training argument each sampling key of the file is read from, where the names differ
_SAMPLING_SOURCE = {"max_new_tokens": "max_completion_length"}


def _sampling_record(training_args) -> dict:
    values = {key: getattr(training_args, _SAMPLING_SOURCE.get(key, key), None) for key in SAMPLING_KEYS}
    return {k: v for k, v in values.items() if v is not None}


def _dataset_record(script_args) -> dict:
    data = {"name": script_args.dataset_name}
    marker = Path(script_args.dataset_name) / "prepare_data.json"
    if marker.is_file():  # prepare-data's record: sizes, scale, seed, degradation config
        data["prepare_data"] = json.loads(marker.read_text()).get("arguments")
    elif script_args.dataset_name == "demo":
        data.update(
            hr_size=script_args.demo_hr_size,
            seed=script_args.demo_seed,
            degradations_per_image=script_args.demo_degradations_per_image,
        )
    return data


def reward_records(script_args, training_args) -> list[dict]:
    """The run's rewards as ``load_rewards`` specs: what ``vlcot_grpo.heldout`` rebuilds them from. After
    ``grpo.build_rewards`` the weights are all in ``reward_weights``; an entry's own weight counts only before."""
    from collections.abc import Mapping

    from vlcot_grpo.rewards import recipe_specs

    entries = getattr(script_args, "rewards", None)  # SFT has none
    if not entries:
        return []
    weights = training_args.reward_weights
    if weights:
        entries = [{k: v for k, v in e.items() if k != "weight"} if isinstance(e, Mapping) else e for e in entries]
    return recipe_specs(entries, script_args.reward_kwargs, weights)


def _training_record(training_args, model_args) -> dict:
    return {
        "learning_rate": training_args.learning_rate,
        "max_steps": training_args.max_steps,
        "num_train_epochs": training_args.num_train_epochs,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "num_generations": getattr(training_args, "num_generations", None),
        "beta": getattr(training_args, "beta", None),
        "seed": training_args.seed,
        "use_peft": model_args.use_peft,
        "lora_r": model_args.lora_r if model_args.use_peft else None,
        "load_in_4bit": model_args.load_in_4bit,
    }


def training_settings(method: str, model, script_args, training_args, model_args, argv, dataset=None) -> dict:
    """Everything a run saves: the family, the base (path, Hub id, fingerprint), sizes, prompt, sampling, rewards,
    data, training settings and the recipe as run. ``model`` is the base as loaded, before any adapter."""
    from vlcot_grpo.models import BACKENDS

    prompt = training_args.prompt_template
    if dataset is not None and "prompt" in dataset.column_names and len(dataset):
        prompt = dataset[0]["prompt"]  # what the model was trained on (a prepare-data prompt file, or the template)
    family = model.config.model_type
    model_class = BACKENDS[family].model_class if family in BACKENDS else None
    base_path = model_args.model_name_or_path
    return {
        "method": method,
        "family": family,
        "model_class": model_class.__name__ if model_class else None,
        # where the class is imported from: transformers for Emu3, this package for a family it defines (PURE)
        "model_module": _public_module(model_class) if model_class else None,
        "adapter": bool(model_args.use_peft),
        "base_model": {
            "path": str(Path(base_path).resolve()) if Path(base_path).exists() else base_path,
            "hub_id": script_args.base_model_id,
            "fingerprint": base_fingerprint(model),
        },
        "lr_size": training_args.lr_size,
        "stage_sizes": {k: list(v) for k, v in training_args.stage_sizes.items()},
        "prompt": prompt,
        "sampling": _sampling_record(training_args) if method == "grpo" else {},
        "rewards": reward_records(script_args, training_args),
        "dataset": _dataset_record(script_args),
        "training": _training_record(training_args, model_args),
        "recipe": _recipe(argv),
    }


def final_metrics(log_history: list[dict]) -> dict:
    """The last logged value of each reward and loss metric, and the run's summary row (train_runtime...)."""
    keep = {}
    for row in log_history:
        for key, value in row.items():
            if key == "reward" or key.startswith(("rewards/", "vlcot/format", "loss", "train_")):
                keep[key] = value
    return keep
