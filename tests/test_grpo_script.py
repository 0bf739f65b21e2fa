"""The GRPO script as users run it: a YAML recipe through TRL's parser, command-line overrides, resume."""

import json
from pathlib import Path

import pytest

from vlcot_grpo import grpo

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-emu3" / "grpo" / "config_demo.yaml"


def _argv(tmp_path, *extra):
    return [
        "--config", str(RECIPE), "--model_name_or_path", str(tmp_path / "model"),
        "--output_dir", str(tmp_path / "out"), "--max_completion_length", "96", "--num_generations", "2",
        "--lr_size", "16", "--rough_size", "4", "--middle_size", "8", "--final_size", "16",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--image_log_steps", "1",
        "--tiny_model_spec", "{}", *extra,
    ]  # fmt: skip


def test_recipe_runs_saves_and_resumes(tmp_path, capsys):
    out = grpo.main(_argv(tmp_path, "--max_steps", "2", "--save_steps", "1"))
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert (out / "rewards.png").stat().st_size > 1000
    assert (out / "checkpoint-2").is_dir()
    # the run stopped at step 2; resuming continues from the checkpoint instead of starting over
    capsys.readouterr()
    grpo.main(_argv(tmp_path, "--max_steps", "3", "--save_steps", "1", "--resume_from_checkpoint", "last"))
    printed = capsys.readouterr().out
    assert printed.count("'loss'") == 1, printed  # only step 3 was trained
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    steps = [row["step"] for row in state["log_history"] if "loss" in row]
    assert steps == [1, 2, 3]  # step 1 and 2 come from the resumed checkpoint's history, not a rerun


def test_command_line_overrides_the_recipe(tmp_path):
    script_args, training_args, model_args = grpo.parse_args(
        _argv(tmp_path, "--guidance_scale", "2.5", "--rewards", "format", "fidelity")
    )
    assert training_args.guidance_scale == 2.5 and script_args.rewards == ["format", "fidelity"]
    assert training_args.rough_size == 4 and model_args.use_peft


def test_recipe_typo_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text() + "\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown keys 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        grpo.parse_args(["--config", str(bad)])


def test_recipe_that_is_not_yaml(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("rewards: [format, fidelity\n")
    with pytest.raises(ValueError, match="broken.yaml is not valid YAML"):
        grpo.parse_args(["--config", str(bad)])


def test_unknown_reward_name_lists_the_known_ones(tmp_path):
    with pytest.raises(Exception, match="fidelty.*fidelity"):
        grpo.main(_argv(tmp_path, "--rewards", "format", "fidelty", "--reward_weights", "1", "1", "--max_steps", "1"))


def test_missing_dataset_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        grpo.main(_argv(tmp_path, "--dataset_name", str(tmp_path / "nowhere"), "--max_steps", "1"))


def test_length_limit_below_a_complete_chain_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"max_completion_length=40 cannot hold a complete VLCoT chain.*take \d+ tokens"
    ):
        grpo.main(_argv(tmp_path, "--max_completion_length", "40", "--max_steps", "1"))


def test_the_dataset_is_checked_before_the_model_loads(tmp_path):
    """A wrong dataset path fails first, in seconds, and names the dataset (the model path is wrong too here)."""
    argv = _argv(tmp_path, "--dataset_name", str(tmp_path / "no-data"), "--build_tiny_model", "false")
    with pytest.raises(FileNotFoundError, match="dataset_name .*no-data"):
        grpo.main(argv)
    with pytest.raises(FileNotFoundError, match="no such folder"):  # then the model, with a message of its own
        grpo.main(_argv(tmp_path, "--model_name_or_path", str(tmp_path / "a" / "b"), "--build_tiny_model", "false"))


def test_mapping_reward_entries_run_and_are_saved_so_that_they_rebuild(tmp_path):
    """A recipe whose rewards are mappings (weights, kwargs, a label) trains, and what the run saves of them builds
    the same rewards again (the held-out check and the model card read it)."""
    from vlcot_grpo.heldout import run_rewards
    from vlcot_grpo.saved_settings import read_settings

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        RECIPE.read_text()
        .replace(
            "rewards: [format, degradation, understanding, fidelity]",
            "rewards:\n  - {name: format, label: fmt}\n  - {name: degradation, weight: 0.5, kwargs: {graded: true}}",
        )
        .replace("reward_weights: [1.0, 1.0, 1.0, 1.0]", "")
    )
    argv = _argv(tmp_path, "--max_steps", "1", "--save_strategy", "no")
    argv[1] = str(recipe)
    out = grpo.main(argv)
    saved = read_settings(out)["rewards"]
    assert saved == [
        {"name": "format", "weight": 1.0, "kwargs": {}, "label": "fmt"},
        {"name": "degradation", "weight": 0.5, "kwargs": {"graded": True}},
    ]
    funcs, weights = run_rewards({"rewards": saved})
    assert weights == {"fmt": 1.0, "degradation": 0.5} and funcs[1].reward.graded
