"""Every recipe in recipes/ parses with its script's parser: no unknown key, values of the right type."""

from pathlib import Path

import pytest

from vlcot_grpo import grpo, sft
from vlcot_grpo.script_utils import check_model_args

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*/*.yaml"))
CPU = ["--bf16", "false", "--use_cpu", "true"]  # the paper recipes ask for bf16, which this CPU cannot check


def test_there_are_recipes_for_both_methods():
    methods = {path.parent.name for path in RECIPES}
    assert {"sft", "grpo"} <= methods, RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: "/".join(p.parts[-3:]))
def test_recipe_parses(recipe):
    method = recipe.parent.name
    script = {"sft": sft, "grpo": grpo}[method]
    script_args, training_args, model_args = script.parse_args(["--config", str(recipe), *CPU])
    assert model_args.model_name_or_path
    check_model_args(model_args)  # every ModelConfig field it sets is one the scripts honour
    assert script_args.dataset_name
    for name in ("lr_size", "rough_size", "middle_size", "final_size"):
        assert getattr(training_args, name) > 0
    assert training_args.rough_size < training_args.middle_size < training_args.final_size
    if method == "grpo":
        assert len(training_args.reward_weights) == len(script_args.rewards)
        assert training_args.max_completion_length > 0
