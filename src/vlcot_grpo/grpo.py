"""GRPO with VLCoT rollouts: ``python -m vlcot_grpo.grpo --config recipes/<model>/grpo/<name>.yaml [--key value ...]``.

Works as is under ``accelerate launch --config_file accelerate_configs/zero2.yaml -m vlcot_grpo.grpo --config ...``.
Script, training and model arguments come from one YAML file (TRL's parser); the command line overrides it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vlcot_grpo.script_utils import SharedScriptArguments, load_policy, make_trainer, save_run_record, start_run


@dataclass
class GRPOScriptArguments(SharedScriptArguments):
    """What to train on and with which rewards."""

    rewards: list[str] = field(
        default_factory=lambda: ["format", "degradation", "understanding", "fidelity"],
        metadata={
            "help": "Rewards by short name (format, degradation, understanding, generation, fidelity), file path "
            "('rewards/my_reward.py:MyReward') or import path ('my_pkg.mod:fn'). Weights: `reward_weights`. In a "
            "YAML recipe an entry may also be a mapping {name, kwargs, weight, label} (vlcot_grpo.rewards.loader)."
        },
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Constructor keyword arguments per reward, e.g. {'generation': {'metrics': ['piqe']}}."},
    )


def parse_args(argv=None):
    from trl import ModelConfig, TrlParser

    from vlcot_grpo.config import VLCoTGRPOConfig, check_recipe_keys

    types = (GRPOScriptArguments, VLCoTGRPOConfig, ModelConfig)
    check_recipe_keys(argv, types)
    parser = TrlParser(types)
    return parser.parse_args_and_config(args=argv)


def build_rewards(script_args: GRPOScriptArguments, training_args):
    from vlcot_grpo.rewards import load_rewards, recipe_specs

    specs = recipe_specs(script_args.rewards, script_args.reward_kwargs, training_args.reward_weights)
    funcs, weights = load_rewards(specs)
    training_args.reward_weights = list(weights)
    return funcs


def check_completion_budget(model, tokenizer, training_args) -> None:
    """Fail before training when ``max_completion_length`` cannot hold a complete chain at the stage sizes."""
    from vlcot_grpo.models import load_backend
    from vlcot_grpo.vlcot import min_completion_tokens

    sizes = training_args.stage_sizes
    need = min_completion_tokens(load_backend(model, tokenizer), sizes)
    if training_args.max_completion_length < need:
        raise ValueError(
            f"max_completion_length={training_args.max_completion_length} cannot hold a complete VLCoT chain at "
            f"stage sizes {sizes}: the images and tags alone take {need} tokens. Raise it (add room for the text)."
        )


def main(argv=None) -> Path:
    run = start_run(argv, parse_args)
    script_args, training_args, model_args = run.script_args, run.training_args, run.model_args

    from vlcot_grpo.plots import plot_rewards
    from vlcot_grpo.trainer import VLCoTGRPOTrainer

    rewards = build_rewards(script_args, training_args)  # a bad reward fails before the model loads, too
    model, tokenizer = load_policy(model_args, training_args, script_args)
    check_completion_budget(model, tokenizer, training_args)
    trainer = make_trainer(VLCoTGRPOTrainer, "grpo", run, model, tokenizer, reward_funcs=rewards)
    device, rollout = trainer.accelerator.device, trainer.engine.config
    engine = trainer.engine.resolved_engine(device)  # walks the parameters (quantized or not): once
    static = engine == "static"
    logging.getLogger("vlcot_grpo").info(
        "rollout engine: %s (decode steps compiled: %s, prompt cache shared: %s, projections fused: %s), LoRA "
        "adapters merged for rollouts: %s",
        engine,
        static and rollout.resolved_compile(device),
        static and rollout.shares_prompt_cache(training_args.num_generations),
        static and rollout.resolved_fuse(device),
        trainer.merges_adapters_for_rollouts,
    )
    trainer.train(resume_from_checkpoint=run.resume)
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        save_run_record(trainer, output_dir)  # after save_model, whose PEFT card it replaces
        weights = dict(zip(trainer.reward_func_names, trainer.reward_weights.tolist()))
        plot = plot_rewards(trainer.state.log_history, output_dir / "rewards.png", weights)
        print(f"GRPO done. Model/adapter: {output_dir}")
        print(f"  reward plot:    {plot}")
        print(f"  sample pictures: {output_dir / 'samples'}")
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return output_dir


if __name__ == "__main__":
    main(sys.argv[1:])
