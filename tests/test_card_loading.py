"""What a user takes away from training: the model card, vlcot_settings.json, an adapter that loads from any folder
with plain PEFT and with vlcot_grpo.load_pretrained, and a refusal to load it on another base."""

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import Emu3ForConditionalGeneration

import vlcot_grpo
from vlcot_grpo.saved_settings import read_settings


@pytest.fixture(scope="module")
def trained(grpo_adapter):
    return grpo_adapter


def test_adapter_loads_from_another_folder_with_plain_peft_and_the_loader(trained, tmp_path, monkeypatch):
    out = trained / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(trained / "model")  # absolute: not 'model'
    monkeypatch.chdir(tmp_path)  # elsewhere, as after a download
    base = Emu3ForConditionalGeneration.from_pretrained(config["base_model_name_or_path"])
    plain = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    model, tokenizer = vlcot_grpo.load_pretrained(str(out), dtype="float32")
    assert type(model) is Emu3ForConditionalGeneration and tokenizer.convert_tokens_to_ids("<final_image>") > 0
    ours, theirs = model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the same with the base named and the adapter apart
    again, _ = vlcot_grpo.load_pretrained(str(trained / "model"), adapter=str(out), dtype="float32")
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_model_card_says_what_was_trained_and_its_snippet_runs(trained, tmp_path, monkeypatch):
    card = (trained / "out" / "README.md").read_text()
    assert "[None]" not in card and 'model="None"' not in card  # TRL's stock text
    for expected in ("| base model | `", "Emu3ForConditionalGeneration", "| fidelity | 1.0 |", "final 16x16", "2506.16796",
                     "prompt_template:", "--max_steps 1", "rewards/format/mean", "demo (bundled photos"):  # fmt: skip
        assert expected in card, expected
    snippet = re.search(r"```python\n(.*?)```", card, re.S)[1]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(snippet, namespace)  # the card's own loading code, as a user would paste it
    assert isinstance(namespace["model"], PeftModel)
    settings = read_settings(trained / "out")
    assert settings["lr_size"] == 16 and settings["stage_sizes"]["final"] == [16, 16]
    assert settings["sampling"]["temperature"] == 0.7 and settings["prompt"].startswith("Super-resolve <|image|>")


def test_base_model_id_goes_into_the_adapter_config_and_the_card(trained, monkeypatch, train_tiny_grpo):
    monkeypatch.chdir(trained)
    out = train_tiny_grpo("--output_dir", "out-hub", "--base_model_id", "someone/tiny-emu3-sft")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "someone/tiny-emu3-sft"
    card = (out / "README.md").read_text()
    assert "base_model: someone/tiny-emu3-sft" in card
    # offline, the Hub id cannot be fetched: the loader takes the base from base=
    model, _ = vlcot_grpo.load_pretrained(str(out), base=str(trained / "model"), dtype="float32")
    assert type(model) is Emu3ForConditionalGeneration


def test_an_adapter_on_another_base_is_refused(trained, tmp_path):
    from vlcot_grpo.models.tiny import TinyEmu3Spec, save_tiny_emu3

    other = save_tiny_emu3(tmp_path / "other", TinyEmu3Spec(seed=123))
    with pytest.raises(ValueError, match="trained on another base"):
        vlcot_grpo.load_pretrained(str(other), adapter=str(trained / "out"), dtype="float32")
    model, _ = vlcot_grpo.load_pretrained(str(other), adapter=str(trained / "out"), dtype="float32", check_base=False)
    assert type(model) is Emu3ForConditionalGeneration


def test_an_adapter_given_as_a_model_folder_without_base_is_explained(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="names no base model"):
        vlcot_grpo.load_pretrained(str(tmp_path))


def test_a_pure_adapter_card_snippet_imports_the_family_class_from_this_package(tmp_path, monkeypatch):
    """PURE's class is the project's own, not transformers': the card's plain-PEFT snippet imports it from here."""
    from vlcot_grpo import grpo

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-pure" / "grpo" / "config_demo.yaml"
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    out = grpo.main([
        "--config", str(recipe), "--model_name_or_path", "model", "--output_dir", "out", "--max_completion_length",
        "400", "--num_generations", "2", "--per_device_train_batch_size", "2", "--report_to", "none",
        "--image_log_steps", "0", "--tiny_model_spec", "{}", "--max_steps", "1", "--save_strategy", "no",
    ])  # fmt: skip
    card = (out / "README.md").read_text()
    assert "from vlcot_grpo.models.pure import PureForConditionalGeneration" in card
    monkeypatch.chdir(tmp_path.parent)
    namespace = {}
    exec(re.search(r"```python\n(.*?)```", card, re.S)[1], namespace)
    assert type(namespace["model"].get_base_model()).__name__ == "PureForConditionalGeneration"
