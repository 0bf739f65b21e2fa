"""Helpers the SFT and GRPO scripts share: building the tiny model from a recipe, the recipe's prompt."""

import json
from types import SimpleNamespace

import datasets
import pytest
from transformers import AutoConfig

from vlcot_grpo.models.tiny import SPEC_FILE, save_tiny_emu3
from vlcot_grpo.script_utils import SharedScriptArguments, _ensure_tiny_model, load_train_dataset
from vlcot_grpo.vlcot import DEFAULT_PROMPT


class _Args(SimpleNamespace):
    """The bits of a training config these helpers read."""

    def main_process_first(self, desc=""):
        import contextlib

        return contextlib.nullcontext()


def test_tiny_model_is_built_from_the_spec_and_rebuilt_when_it_changes(tmp_path):
    path = tmp_path / "tiny"
    _ensure_tiny_model(str(path), "emu3", {"hidden_size": 32}, _Args())
    assert AutoConfig.from_pretrained(path).text_config.hidden_size == 32
    _ensure_tiny_model(
        str(path), "emu3", '{"hidden_size": 48, "num_hidden_layers": 1}', _Args()
    )  # from the command line
    config = AutoConfig.from_pretrained(path).text_config
    assert (config.hidden_size, config.num_hidden_layers) == (48, 1)


def test_a_checkpoint_that_is_not_a_tiny_build_is_never_overwritten(tmp_path):
    path = save_tiny_emu3(tmp_path / "trained")
    (path / SPEC_FILE).unlink()  # what a fine-tuned model saved by a trainer looks like
    weights = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    _ensure_tiny_model(str(path), "emu3", {"hidden_size": 32}, _Args())
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == weights


def test_other_processes_look_at_the_folder_only_after_the_main_one_built_it(tmp_path):
    """Under `accelerate launch` with several processes the main one builds the tiny model while the others wait.
    A waiting process must not judge the folder before that: half-written (no spec file yet) it looks like a real
    checkpoint, and the process would load it unfinished (seen with two DeepSpeed processes on the CPU)."""
    import contextlib

    path = tmp_path / "tiny"
    path.mkdir()  # what a non-main process saw: the main process has started writing
    waited = []

    class Waiting(_Args):
        @contextlib.contextmanager
        def main_process_first(self, desc=""):
            save_tiny_emu3(path)  # the main process finishes while this one waits
            waited.append(desc)
            yield

    _ensure_tiny_model(str(path), "emu3", {}, Waiting())
    assert waited and (path / SPEC_FILE).exists() and AutoConfig.from_pretrained(path).model_type == "emu3"


def test_unknown_spec_field_is_named(tmp_path):
    with pytest.raises(ValueError, match="tiny_model_spec.*hiden_size.*TinyEmu3Spec"):
        _ensure_tiny_model(str(tmp_path / "tiny"), "emu3", {"hiden_size": 32}, _Args())
    with pytest.raises(ValueError, match="tiny_model_spec.*vq_embed_dimm.*TinyPureSpec"):
        _ensure_tiny_model(str(tmp_path / "tiny"), "pure", {"vq_embed_dimm": 4}, _Args())
    with pytest.raises(ValueError, match="tiny_model_family 'janos': expected one of \\['emu3', 'janus', 'pure'\\]"):
        _ensure_tiny_model(str(tmp_path / "tiny"), "janos", {}, _Args())


def test_the_family_is_part_of_what_a_tiny_build_is_checked_against(tmp_path):
    """A tiny Emu3 at the path is rebuilt as a tiny PURE when the recipe asks for that family, and kept otherwise."""
    import json

    path = tmp_path / "tiny"
    _ensure_tiny_model(str(path), "emu3", {}, _Args())
    _ensure_tiny_model(str(path), "pure", {}, _Args())
    assert json.loads((path / "config.json").read_text())["model_type"] == "vlcot_pure"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    _ensure_tiny_model(str(path), "pure", {}, _Args())
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def _dataset_folder(tmp_path):
    folder = tmp_path / "data"
    datasets.Dataset.from_dict({"prompt": [DEFAULT_PROMPT] * 2, "x": [1, 2]}).save_to_disk(str(folder))
    return str(folder)


def test_recipe_prompt_replaces_the_dataset_prompt(tmp_path):
    data = SharedScriptArguments(dataset_name=_dataset_folder(tmp_path))
    kept = load_train_dataset(data, _Args(prompt_template=DEFAULT_PROMPT))
    assert kept["prompt"] == [DEFAULT_PROMPT] * 2
    replaced = load_train_dataset(data, _Args(prompt_template="Fix <|image|> now."))
    assert replaced["prompt"] == ["Fix <|image|> now."] * 2 and replaced["x"] == [1, 2]
    with pytest.raises(ValueError, match="prompt_template must contain '<\\|image\\|>'"):
        load_train_dataset(data, _Args(prompt_template="no placeholder"))


def test_demo_degradations_per_image_reaches_the_demo_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("VLCOT_GRPO_CACHE", str(tmp_path / "cache"))
    training = _Args(prompt_template=DEFAULT_PROMPT, stage_sizes=None)
    one = load_train_dataset(SharedScriptArguments(demo_hr_size=32, demo_seed=5), training)
    data = SharedScriptArguments(demo_hr_size=32, demo_seed=4, demo_degradations_per_image=2)
    two = load_train_dataset(data, training)
    assert len(two) == 2 * len(one) and list(two["source"]) == list(one["source"]) * 2
    # the second copy is the demo at seed 5
    assert list(two["degradation_params"])[len(one) :] == list(one["degradation_params"])


def test_missing_split_is_named(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"x": [1]})}).save_to_disk(str(folder))
    with pytest.raises(KeyError, match="no split 'train'; it has \\['test'\\]"):
        load_train_dataset(SharedScriptArguments(dataset_name=str(folder)), _Args(prompt_template=DEFAULT_PROMPT))
    assert json.loads((folder / "dataset_dict.json").read_text())["splits"] == ["test"]


def test_resume_last_skips_a_half_written_checkpoint(tmp_path, caplog):
    """A run killed while saving checkpoint-4 leaves it without trainer_state.json (written last): 'last' takes
    checkpoint-2 and names checkpoint-4."""
    import json
    import logging
    from types import SimpleNamespace

    from vlcot_grpo.script_utils import resume_checkpoint

    for step, complete in ((2, True), (4, False), (10, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 10)
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 1')  # cut off mid-write
    args = SimpleNamespace(resume_from_checkpoint="last", output_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="vlcot_grpo"):
        assert resume_checkpoint(args) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-10" in caplog.text and "checkpoint-4" in caplog.text and "incomplete" in caplog.text
    with pytest.raises(ValueError, match="checkpoint-4 is incomplete"):
        resume_checkpoint(SimpleNamespace(resume_from_checkpoint=str(tmp_path / "checkpoint-4"), output_dir=""))


@pytest.mark.parametrize(
    "path,message",
    [
        ("outputs/emu3/sft", "no such folder .a local path"),
        ("./model", "no such folder"),
        ("org/name", "HF_HUB_OFFLINE"),
    ],
)
def test_a_missing_model_folder_is_named_as_such(path, message, monkeypatch):
    from vlcot_grpo.script_utils import check_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=message):
        check_model_path(path)
