"""The README's "Training a real model" commands, run as written through the `vlcot-grpo` CLI, offline, on a tiny
look-alike of BAAI/Emu3-Gen-hf (vlcot_grpo.models.lookalike): prepare -> prepare-data -> SFT -> GRPO (full and
QLoRA) -> upscale -> evaluate. The only changes to the commands: the hub id becomes the look-alike's folder, and
small sizes, CPU settings and few steps are appended (a later flag overrides the recipe's or the earlier one)."""

import json
import logging
import re
import shlex
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image
from safetensors import safe_open

from vlcot_grpo.cli import main as cli
from vlcot_grpo.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["--lr_size", "16", "--rough_size", "8", "--middle_size", "16", "--final_size", "32"]
CPU = ["--bf16", "false", "--use_cpu", "true", "--dtype", "float32", "--activation_checkpointing", "false"]
TRAIN = [*SIZES, *CPU, "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--seed", "0"]
#: appended to each command of the README block, by sub-command
EXTRA = {
    "prepare": [],
    "prepare-data": ["--hr-size", "32", "--scale", "2", "--no-progress"],
    # enough steps at a high rate for the tiny model to learn its two traces' format, so that the greedy upscale
    # below writes complete chains (the demo recipe's cold start does the same at a larger size)
    "sft": [
        *TRAIN, "--max_steps", "60", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps",
        "0", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--image_loss_weight", "0.1",
        "--format_check_samples", "2",
    ],
    "grpo": [
        *TRAIN, "--max_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "2",
        "--max_completion_length", "300", "--image_log_steps", "1",
        "--rewards", "format", "degradation", "understanding", "fidelity", "--reward_weights", "1", "1", "1", "1",
    ],
    "upscale": ["--lr-size", "16", "--sizes", "8", "16", "32", "--max-new-tokens", "300", "--greedy", "--device", "cpu",
                "--dtype", "float32"],
    "evaluate": ["--metrics", "psnr", "ssim", "--device", "cpu"],  # the README's lpips/musiq download weights
}  # fmt: skip


def readme_commands(heading: str = "## Training a real model") -> list[list[str]]:
    """The commands of the first block of README's section ``heading`` that runs ``vlcot-grpo``, split as a shell
    would."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(heading) :]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "\nvlcot-grpo " in "\n" + b)
    commands = [shlex.split(line) for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert all(c[0] == "vlcot-grpo" for c in commands), commands
    return [c[1:] for c in commands]


def test_readme_block_covers_the_whole_path():
    names = [c[0] for c in readme_commands()]
    assert names == ["prepare", "prepare-data", "sft", "grpo", "grpo", "upscale", "upscale", "evaluate"]
    recipes = [c[c.index("--config") + 1] for c in readme_commands() if "--config" in c]
    assert all((ROOT / r).exists() for r in recipes), recipes


def _photos(folder: Path, size: int, names=("astronaut", "chelsea")) -> None:
    folder.mkdir()
    for name in names:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        photo.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{name}.png")


def test_readme_real_model_path_on_an_emu3_lookalike(lookalike_path, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO, logger="vlcot_grpo")
    monkeypatch.chdir(tmp_path)  # the README's relative paths (models/, data/, outputs/, sr/) land here
    _photos(tmp_path / "photos", 64)
    _photos(tmp_path / "hr_photos", 32)
    _photos(tmp_path / "lr_photos", 16)
    for argv in readme_commands():
        argv = [str(lookalike_path) if a == "BAAI/Emu3-Gen-hf" else a for a in argv]
        argv = [str(ROOT / a) if a.startswith("recipes/") else a for a in argv]
        code = cli([*argv, *EXTRA[argv[0]]])
        assert code == 0, (argv, capsys.readouterr())
    printed = capsys.readouterr().out

    prepared = tmp_path / "models" / "emu3-gen-vlcot"
    record = json.loads((prepared / "vlcot_tokens.json").read_text())
    assert record["how"] == "repurposed" and record["replaced"]["<degradation>"] == "<|extra_1|>"
    assert "format-valid rate of 2 greedy rollouts" in printed
    # the cold start is a full fine-tune: the tags' rows train as any weight
    ids = sorted(record["ids"].values())
    before, after = load_model(str(prepared)), load_model(str(tmp_path / "outputs" / "emu3" / "sft"))
    for layer in ("get_input_embeddings", "get_output_embeddings"):
        old, new = getattr(before, layer)().weight[ids], getattr(after, layer)().weight[ids]
        assert not torch.allclose(old, new), layer
    # the full fine-tune's GRPO, then the QLoRA one: a 4-bit base, rollouts on the reference engine, never merged
    engines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rollout engine:")]
    assert len(engines) == 2 and all(m.startswith("rollout engine: reference") for m in engines), engines
    assert engines[1].endswith("LoRA adapters merged for rollouts: False"), engines
    assert any(
        r.getMessage().startswith("quantized base") and "'Linear4bit'" in r.getMessage() for r in caplog.records
    )
    full = tmp_path / "outputs" / "emu3" / "grpo"
    assert (full / "model.safetensors").exists() and (full / "rewards.png").exists()
    qlora = tmp_path / "outputs" / "emu3" / "grpo-qlora"
    config = json.loads((qlora / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] and (qlora / "adapter_model.safetensors").exists()
    with safe_open(qlora / "adapter_model.safetensors", "pt") as f:
        assert any("trainable_tokens_delta" in k for k in f.keys())
    for sr in ("sr", "sr-qlora"):
        assert (tmp_path / sr / "astronaut.png").exists(), sorted(p.name for p in (tmp_path / sr).iterdir())
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["mean"]) == {"psnr", "ssim"} and len(scores["per_image"]) == 2


PURE_HEADING = "## The paper's model: PURE / Lumina-mGPT"
PURE_SIZES = ["--lr_size", "32", "--rough_size", "32", "--middle_size", "64", "--final_size", "96"]
PURE_TRAIN = [*PURE_SIZES, *CPU, "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--seed", "0"]
PURE_EXTRA = {
    "convert": [],
    "prepare": [],
    "prepare-data": ["--hr-size", "96", "--scale", "2", "--no-progress"],
    "sft": [
        *PURE_TRAIN, "--max_steps", "60", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
        "--warmup_steps", "0", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--image_loss_weight", "0.1", "--format_check_samples", "2",
    ],
    "grpo": [
        *PURE_TRAIN, "--max_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "2",
        "--max_completion_length", "600", "--image_log_steps", "1",
        "--rewards", "format", "degradation", "understanding", "fidelity", "--reward_weights", "1", "1", "1", "1",
    ],
    "upscale": ["--lr-size", "32", "--sizes", "32", "64", "96", "--max-new-tokens", "600", "--greedy", "--device",
                "cpu", "--dtype", "float32"],
}  # fmt: skip


def test_readme_pure_path_on_a_published_pure_lookalike(tmp_path, monkeypatch, capsys):
    """The paper's model: the published PURE folder and vq_ds8_c2i.pt (a tiny look-alike) through convert, prepare,
    prepare-data, SFT, GRPO and upscale as the README writes them."""
    from vlcot_grpo.models.lookalike import save_pure_lookalike

    download = save_pure_lookalike(tmp_path / "download")
    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "photos", 192)
    _photos(tmp_path / "lr_photos", 32)
    commands = readme_commands(PURE_HEADING)
    assert [c[0] for c in commands] == ["convert", "prepare", "prepare-data", "sft", "grpo", "upscale"]
    swap = {"PURE": str(download / "model"), "vq_ds8_c2i.pt": str(download / "vq_ds8_c2i.pt")}
    for argv in commands:
        argv = [swap.get(a, str(ROOT / a) if a.startswith("recipes/") else a) for a in argv]
        code = cli([*argv, *PURE_EXTRA[argv[0]]])
        assert code == 0, (argv, capsys.readouterr())
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "models" / "pure-vlcot" / "vlcot_tokens.json").read_text())["how"] == "added"
    assert "format-valid rate of 2 greedy rollouts" in printed
    grpo = load_model(str(tmp_path / "outputs" / "pure" / "grpo"))
    assert type(grpo).__name__ == "PureForConditionalGeneration"
    assert (tmp_path / "outputs" / "pure" / "grpo" / "rewards.png").exists()
    outputs = sorted(p.name for p in (tmp_path / "sr-pure").iterdir())
    assert "astronaut.png" in outputs, outputs
    assert Image.open(tmp_path / "sr-pure" / "astronaut.png").size == (96, 96)


@pytest.mark.parametrize("family", ["emu3", "vlcot_pure", "janus"])
def test_each_family_has_a_lookalike(family):
    from vlcot_grpo.models import BACKENDS
    from vlcot_grpo.models.lookalike import LOOKALIKES

    assert set(LOOKALIKES) == set(BACKENDS) and family in LOOKALIKES


JANUS_HEADING = "## Janus-Pro: the smallest real unified model"
JANUS_SIZES = ["--lr_size", "32", "--rough_size", "8", "--middle_size", "16", "--final_size", "32"]
JANUS_TRAIN = [
    *JANUS_SIZES,
    *CPU,
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--logging_steps",
    "1",
    "--seed",
    "0",
]
JANUS_EXTRA = {
    "prepare": [],
    "prepare-data": ["--hr-size", "64", "--scale", "2", "--no-progress"],
    "sft": [
        *JANUS_TRAIN, "--max_steps", "10", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
        "--warmup_steps", "0", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--image_loss_weight", "0.1", "--format_check_samples", "2", "--lora_r", "16", "--lora_alpha", "32",
    ],
    "grpo": [
        *JANUS_TRAIN, "--max_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "2",
        "--max_completion_length", "400", "--image_log_steps", "1", "--guidance_scale", "2.0", "--lora_r", "16",
        "--lora_alpha", "32",
        "--rewards", "format", "degradation", "understanding", "fidelity", "--reward_weights", "1", "1", "1", "1",
    ],
    "upscale": ["--lr-size", "32", "--sizes", "8", "16", "32", "--max-new-tokens", "400", "--greedy", "--device",
                "cpu", "--dtype", "float32"],
}  # fmt: skip


def test_readme_janus_path_on_a_published_janus_lookalike(tmp_path, monkeypatch, capsys, presets):
    """Janus-Pro: the published checkpoint (a tiny look-alike: the stock class, more text rows than tokenizer ids)
    through prepare, prepare-data, SFT and GRPO with LoRA, and upscale, as the README writes them; the SFT adapter
    then loads onto transformers' stock JanusForConditionalGeneration with PEFT, as a Hub user would load it.

    LoRA on a random tiny model (frozen random heads) does not learn the chain's format in a few steps, so upscale
    runs with logit hooks that open the rough image at once and chain the stages (benchmarks/rollout.py)."""
    from peft import PeftModel
    from transformers import JanusForConditionalGeneration

    from vlcot_grpo import inference
    from vlcot_grpo.models.lookalike import save_janus_lookalike

    load = inference.load_for_inference

    def load_with_hooks(*args, **kwargs):
        model, tokenizer, backend = load(*args, **kwargs)
        presets.add_chain_hooks(model, backend)
        bias = torch.zeros(backend.vocab_size)
        bias[backend.tag_ids["<rough_image>"]] = 50.0
        backend.logits_module.register_forward_hook(lambda m, i, out: out + bias)
        return model, tokenizer, backend

    monkeypatch.setattr(inference, "load_for_inference", load_with_hooks)
    download = save_janus_lookalike(tmp_path / "download")
    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "photos", 128)
    _photos(tmp_path / "lr_photos", 32)
    commands = readme_commands(JANUS_HEADING)
    assert [c[0] for c in commands] == ["prepare", "prepare-data", "sft", "grpo", "upscale"]
    for argv in commands:
        argv = [str(download) if a == "deepseek-community/Janus-Pro-1B" else a for a in argv]
        argv = [str(ROOT / a) if a.startswith("recipes/") else a for a in argv]
        code = cli([*argv, *JANUS_EXTRA[argv[0]]])
        assert code == 0, (argv, capsys.readouterr())
    printed = capsys.readouterr().out
    prepared = tmp_path / "models" / "janus-pro-1b-vlcot"
    record = json.loads((prepared / "vlcot_tokens.json").read_text())
    text_rows = json.loads((prepared / "config.json").read_text())["text_config"]["vocab_size"]
    assert record["how"] == "added" and max(record["ids"].values()) < text_rows  # unused rows: nothing resized
    assert text_rows == json.loads((download / "config.json").read_text())["text_config"]["vocab_size"]
    assert "format-valid rate of 2 greedy rollouts" in printed
    assert Image.open(tmp_path / "sr-janus" / "astronaut.png").size == (32, 32)
    upscaled = json.loads((tmp_path / "sr-janus" / "astronaut.json").read_text())
    assert upscaled["final"] == "sr-janus/astronaut.png"  # the hooked chain has images only: text blocks are missing

    sft = tmp_path / "outputs" / "janus-pro-1b" / "sft"
    merged = load_model(str(sft)).eval()
    assert type(merged).__name__ == "JanusForVLCoT"
    stock = JanusForConditionalGeneration.from_pretrained(prepared, dtype=torch.float32)
    hub_user = PeftModel.from_pretrained(stock, sft / "adapter").eval()
    ids = torch.tensor([[1, 2, 3, *record["ids"].values(), 4, 5]])
    with torch.no_grad():
        theirs = hub_user(input_ids=ids).logits
        ours = merged(input_ids=ids).logits
    assert ours.shape[-1] == text_rows + stock.config.vq_config.num_embeddings
    torch.testing.assert_close(ours[..., :text_rows], theirs, rtol=1e-4, atol=1e-4)
    plain = JanusForConditionalGeneration.from_pretrained(prepared, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, theirs, atol=1e-3)  # the adapter does something
