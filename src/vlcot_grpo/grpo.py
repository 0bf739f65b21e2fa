"""GRPO with VLCoT rollouts: ``python -m vlcot_grpo.grpo --config recipes/<model>/grpo/<name>.yaml [--key value ...]``.

Works as is under ``accelerate launch --config_file accelerate_configs/zero2.yaml -m vlcot_grpo.grpo --config ...``.
Script, training and model arguments come from one YAML file (TRL's parser); the command line overrides it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("vlcot_grpo")


@dataclass
class GRPOScriptArguments:
    """What to train on and with which rewards."""

    dataset_name: str = field(
        default="demo",
        metadata={"help": "'demo' (bundled photos, built offline) or a folder written by `vlcot-grpo prepare-data`."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split, when the folder holds a DatasetDict."})
    demo_hr_size: int = field(default=64, metadata={"help": "HR side (pixels) of the demo dataset."})
    rewards: list[str] = field(
        default_factory=lambda: ["format", "degradation", "understanding", "fidelity"],
        metadata={
            "help": "Rewards by short name (format, degradation, understanding, generation, fidelity), file path "
            "('rewards/my_reward.py:MyReward') or import path ('my_pkg.mod:fn'). Weights: `reward_weights`."
        },
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Constructor keyword arguments per reward, e.g. {'generation': {'metrics': ['piqe']}}."},
    )
    build_tiny_model: bool = field(
        default=False,
        metadata={"help": "If model_name_or_path does not exist, build the tiny offline Emu3 there (demo, tests)."},
    )


def parse_args(argv=None):
    from trl import ModelConfig, TrlParser

    from vlcot_grpo.config import VLCoTGRPOConfig, check_recipe_keys

    types = (GRPOScriptArguments, VLCoTGRPOConfig, ModelConfig)
    check_recipe_keys(argv, types)
    parser = TrlParser(types)
    return parser.parse_args_and_config(args=argv)


def load_train_dataset(script_args: GRPOScriptArguments, training_args):
    """The training dataset; every error names the path or field."""
    import datasets

    if script_args.dataset_name == "demo":
        from vlcot_grpo.data.demo import build_demo_dataset

        stage = {"rough": training_args.rough_size, "middle": training_args.middle_size}
        return build_demo_dataset(
            hr_size=script_args.demo_hr_size,
            stage_sizes={**{k: (v, v) for k, v in stage.items()}, "final": (training_args.final_size,) * 2},
            seed=training_args.seed,
        )
    path = Path(script_args.dataset_name)
    if not path.exists():
        raise FileNotFoundError(
            f"dataset_name {script_args.dataset_name!r} is neither 'demo' nor an existing folder; "
            "build one with `vlcot-grpo prepare-data --hr-dir DIR --out DIR`"
        )
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if script_args.dataset_train_split not in loaded:
            raise KeyError(f"{path}: no split {script_args.dataset_train_split!r}; it has {list(loaded)}")
        loaded = loaded[script_args.dataset_train_split]
    return loaded


def build_rewards(script_args: GRPOScriptArguments, training_args):
    from vlcot_grpo.rewards import load_rewards

    kwargs = script_args.reward_kwargs or {}
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    unknown = set(kwargs) - set(script_args.rewards)
    if unknown:
        raise ValueError(f"reward_kwargs names rewards that are not in `rewards`: {sorted(unknown)}")
    weights = training_args.reward_weights or [1.0] * len(script_args.rewards)
    if len(weights) != len(script_args.rewards):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(script_args.rewards)} rewards")
    specs = [{"name": n, "kwargs": kwargs.get(n, {}), "weight": w} for n, w in zip(script_args.rewards, weights)]
    funcs, weights = load_rewards(specs)
    training_args.reward_weights = list(weights)
    return funcs


def load_policy(model_args, training_args, script_args):
    import torch
    from transformers import AutoTokenizer

    from vlcot_grpo.models import load_model

    path = model_args.model_name_or_path
    if path is None:
        raise ValueError("model_name_or_path is required (a checkpoint folder or hub id)")
    if script_args.build_tiny_model and not Path(path).exists():
        from vlcot_grpo.models.tiny import ensure_tiny_emu3

        with training_args.main_process_first(desc="build the tiny model"):  # one writer, the others wait
            ensure_tiny_emu3(path)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = load_model(path, dtype=dtype, attn_implementation=model_args.attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def peft_config_for(model_args, model):
    if not model_args.use_peft:
        return None
    from trl import get_peft_config

    from vlcot_grpo.models import BACKENDS

    if not model_args.lora_target_modules:  # default: the language model's projections, never the VQ model
        model_args.lora_target_modules = BACKENDS[model.config.model_type].lora_target_modules
    return get_peft_config(model_args)


def resume_checkpoint(training_args):
    value = training_args.resume_from_checkpoint
    if value in (None, "", "false", "False"):
        return None
    if str(value).lower() in ("true", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).exists() else None
        if last is None:
            logger.warning(
                "resume_from_checkpoint=%s but %s has no checkpoint: starting fresh", value, training_args.output_dir
            )
        return last
    if not Path(value).exists():
        raise FileNotFoundError(f"resume_from_checkpoint: {value} does not exist")
    return value


def main(argv=None) -> Path:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    script_args, training_args, model_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from vlcot_grpo.plots import plot_rewards
    from vlcot_grpo.trainer import VLCoTGRPOTrainer

    model, tokenizer = load_policy(model_args, training_args, script_args)
    dataset = load_train_dataset(script_args, training_args)
    rewards = build_rewards(script_args, training_args)
    trainer = VLCoTGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config_for(model_args, model),
    )
    logger.info(
        "distributed: %s, processes: %d, deepspeed: %s",
        trainer.accelerator.distributed_type,
        trainer.accelerator.num_processes,
        trainer.is_deepspeed_enabled,
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        plot = plot_rewards(trainer.state.log_history, output_dir / "rewards.png")
        print(f"GRPO done. Model/adapter: {output_dir}")
        print(f"  reward plot:    {plot}")
        print(f"  sample pictures: {output_dir / 'samples'}")
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return output_dir


if __name__ == "__main__":
    main(sys.argv[1:])
