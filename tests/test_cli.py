"""The `vlcot-grpo` command as a new user meets it: help that never runs anything, errors that say what was meant,
no alarming noise, no deprecated recipe keys, the W&B extra, and a warning when photos have no tags."""

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from vlcot_grpo import grpo, sft
from vlcot_grpo.cli import COMMANDS
from vlcot_grpo.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/*/*.yaml"))


def test_help_lists_every_command_and_the_readme_names_them_all(capsys):
    assert cli(["--help"]) == 0
    printed = capsys.readouterr().out
    for name, (_, what) in COMMANDS.items():
        assert f"vlcot-grpo {name} " in printed and what in printed, name
    readme = (ROOT / "README.md").read_text()
    listed = readme[readme.index("The console script `vlcot-grpo` has the sub-commands") :].split("\n\n")[0]
    assert all(f"`{name}`" in listed for name in COMMANDS), listed


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_of_each_command_prints_and_runs_nothing(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # anything a command would write (outputs/, models/) would land here
    with pytest.raises(SystemExit) as stop:
        cli([command, "--help"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "usage:" in printed and "--" in printed
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_command_is_an_error_with_a_suggestion(capsys):
    assert cli(["upscal", "--model", "x"]) == 2
    assert "error: unknown command 'upscal' (did you mean 'upscale'?)" in capsys.readouterr().err


@pytest.mark.parametrize("script, negated", [(grpo, "rollout_merge_adapters"), (sft, "completion_only_loss")])
def test_a_mistyped_command_line_override_gets_a_suggestion(script, negated):
    recipe = ROOT / "recipes" / "tiny-emu3" / script.__name__.rsplit(".", 1)[-1] / "config_demo.yaml"
    with pytest.raises(
        ValueError, match=r"unknown command-line option '--learning_rat' \(did you mean '--learning_rate'\?\)"
    ):
        script.parse_args(["--config", str(recipe), "--learning_rat", "0.1"])
    # the spellings TRL's parser accepts stay accepted: dashes, --key=value, --no_ for a true boolean
    _, args, _ = script.parse_args(["--config", str(recipe), "--learning-rate=0.25", f"--no_{negated}"])
    assert args.learning_rate == 0.25 and getattr(args, negated) is False


def test_no_bitsandbytes_kernel_noise_where_it_is_not_used():
    code = "import vlcot_grpo.inference, peft, transformers.integrations.bitsandbytes"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "kernels-community" not in run.stderr and "gemm_4bit" not in run.stderr, run.stderr


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: "/".join(p.parts[-3:]))
def test_recipes_use_no_deprecated_key(recipe):
    script = {"sft": sft, "grpo": grpo}[recipe.parent.name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' "`gradient_checkpointing` is deprecated"
        _, args, _ = script.parse_args(["--config", str(recipe), "--bf16", "false", "--use_cpu", "true"])
    assert args.activation_checkpointing in (True, False)  # TRL's default (on) where a recipe does not set it
    assert args.gradient_checkpointing == args.activation_checkpointing  # the old name still reads right


def test_a_recipe_with_the_deprecated_key_names_the_new_one(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text((ROOT / "recipes/tiny-emu3/grpo/config_demo.yaml").read_text().replace("activation_", "gradient_"))
    with pytest.raises(ValueError, match="'gradient_checkpointing' is deprecated.*use 'activation_checkpointing'"):
        grpo.parse_args(["--config", str(old)])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_wandb_without_the_extra_says_how_to_install_it(tmp_path):
    recipe = ROOT / "recipes" / "tiny-emu3" / "grpo" / "config_demo.yaml"
    with pytest.raises(ValueError, match=r"pip install -e '\.\[wandb\]'"):
        grpo.main(["--config", str(recipe), "--report_to", "wandb", "--output_dir", str(tmp_path / "out"),
                   "--dataset_name", str(tmp_path / "no-such-dataset")])  # fmt: skip


def test_photos_without_tags_are_warned_about_and_tags_json_is_read(photo, tmp_path, capsys):
    import datasets

    photos = tmp_path / "photos"
    photos.mkdir()
    photo.resize((64, 64)).save(photos / "astronaut.png")
    photo.rotate(90).resize((64, 64)).save(photos / "turned.png")
    common = ["prepare-data", "--hr-dir", str(photos), "--hr-size", "32", "--no-progress"]
    common += ["--cache-dir", str(tmp_path / "cache")]
    assert cli([*common, "--out", str(tmp_path / "a")]) == 0
    assert "2 of 2 images have no tags" in capsys.readouterr().err
    (photos / "tags.json").write_text('{"astronaut.png": {"tags": ["astronaut", "flag"], "caption": "An astronaut."}}')
    assert cli([*common, "--out", str(tmp_path / "b")]) == 0
    assert "1 of 2 images have no tags" in capsys.readouterr().err
    rows = datasets.load_from_disk(str(tmp_path / "b"))
    assert rows[0]["tags"] == ["astronaut", "flag"] and rows[0]["caption"] == "An astronaut."


def test_report_to_wandb_runs_offline_with_the_extra(tmp_path, monkeypatch, train_tiny_grpo):
    pytest.importorskip("wandb")  # the W&B extra: pip install -e '.[wandb]'
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    train_tiny_grpo("--report_to", "wandb", "--image_log_steps", "1")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((tmp_path / "wandb").iterdir())
