"""Cold start: traces, the completion-only loss, the image-token weight, learning the format, and the script."""

from pathlib import Path

import datasets
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import AutoTokenizer, Emu3ForConditionalGeneration

from vlcot_grpo.models import load_backend
from vlcot_grpo.rewards import FormatReward
from vlcot_grpo.rollout import RolloutConfig, RolloutEngine
from vlcot_grpo.sft import ADAPTER_SUBDIR, VLCoTSFTConfig, VLCoTSFTTrainer, main
from vlcot_grpo.traces import build_trace, build_trace_dataset, trace_texts, understanding_texts
from vlcot_grpo.vlcot import STAGES, encode_prompt, parse_completion, parse_completions

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-emu3" / "sft" / "config_demo.yaml"
# Small sizes keep the traces short (grids 4x4 LR, 2x2 / 4x4 / 8x8 stages at downsample 4), so training is quick.
LR_SIZE = 16
SIZES = {"rough": 8, "middle": 16, "final": 32}
GRIDS = {stage: (side // 4, side // 4) for stage, side in SIZES.items()}
SHORT_PROMPT = "Restore <|image|> step by step."
PHOTOS = {  # skimage photo -> (caption, tags, degradation text)
    "astronaut": ("An astronaut.", ["astronaut", "flag"], "heavy blur, light noise"),
    "chelsea": ("A tabby cat.", ["cat", "whiskers"], "light blur, heavy noise"),
    "coffee": ("", ["cup", "saucer"], "medium blur, medium noise"),  # no caption: the tag fallback
    "rocket": ("A rocket at night.", [], "light blur, light noise"),  # no tags
}


def vlcot_rows(prompt: str = SHORT_PROMPT) -> datasets.Dataset:
    """A small dataset with the VLCoT columns (as vlcot_grpo.data builds them), from real photos."""
    rows = []
    for name, (caption, tags, degradation) in PHOTOS.items():
        hr = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
        rows.append(
            {
                "prompt": prompt,
                "lr_image": hr.resize((16, 16), Image.Resampling.BICUBIC),
                "hr_image": hr,
                **{f"target_{s}": hr.resize((side, side), Image.Resampling.BICUBIC) for s, side in SIZES.items()},
                "degradation_text": degradation,
                "tags": tags,
                "caption": caption,
                "source": f"{name}.png",
            }
        )
    return datasets.Dataset.from_list(rows)


def sft_config(tmp_path, **overrides) -> VLCoTSFTConfig:
    settings = dict(
        output_dir=str(tmp_path / "sft"),
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        lr_size=LR_SIZE,
        rough_size=SIZES["rough"],
        middle_size=SIZES["middle"],
        final_size=SIZES["final"],
        per_device_train_batch_size=2,
        seed=0,
    )
    settings.update(overrides)
    return VLCoTSFTConfig(**settings)


def fresh_model(tiny_path):
    """A model of its own (training must not touch the session's shared `tiny` model)."""
    return Emu3ForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32)


# ----- traces ----------------------------------------------------------------------------------------------------


def test_understanding_texts_follow_the_documented_rules():
    with_caption = understanding_texts("  A cat   on a mat. ", ["cat", "mat"])
    assert with_caption == {
        "rough_understand": "A cat on a mat.",
        "middle_understand": "Restore the shapes and edges of cat and mat.",
        "final_understand": "Restore the fine textures and details of cat and mat.",
    }
    assert understanding_texts("", ["rocket", "tower", "sky"])["rough_understand"] == (
        "This image shows rocket, tower and sky."
    )
    no_tags = understanding_texts(None, [])
    assert no_tags["rough_understand"] == "This image shows a natural scene."
    assert no_tags["final_understand"] == "Restore the fine textures and details of the scene."


def test_trace_parses_back_into_the_samples_texts_and_codes(tiny):
    _, _, backend = tiny
    rows = vlcot_rows()
    traces = build_trace_dataset(backend, rows, LR_SIZE, SIZES, batch_size=3)  # batches of 3 and 1
    assert len(traces) == len(rows)
    for row, trace in zip(rows, traces):
        parse = parse_completion(backend, trace["completion_ids"], GRIDS)
        assert parse.complete, parse.problems
        assert parse.texts == trace_texts(row)
        assert parse.texts["degradation"] == row["degradation_text"]
        if row["caption"]:
            assert parse.texts["rough_understand"] == row["caption"]
        for stage in STAGES:
            side = SIZES[stage]
            expected = backend.encode_images([row[f"target_{stage}"]], (side, side))[0]
            assert torch.equal(parse.blocks[f"{stage}_image"].codes, expected), stage
        assert trace["completion_ids"][-1] == backend.eos_token_id
        assert trace["prompt_ids"] == encode_prompt(backend, row["lr_image"], (LR_SIZE, LR_SIZE), SHORT_PROMPT)
        # one row alone gives the same trace as in a batch
        assert build_trace(backend, row, LR_SIZE, SIZES) == trace
    fallback = parse_completion(backend, traces[2]["completion_ids"], GRIDS)
    assert fallback.texts["rough_understand"] == "This image shows cup and saucer."


def test_prompt_column_wins_over_the_prompt_argument(tiny):
    _, _, backend = tiny
    rows = vlcot_rows()
    row = rows[0]
    trace = build_trace(backend, row, LR_SIZE, SIZES, prompt="Other <|image|>")
    assert trace["prompt_ids"] == encode_prompt(backend, row["lr_image"], (LR_SIZE, LR_SIZE), SHORT_PROMPT)
    no_prompt = {k: v for k, v in row.items() if k != "prompt"}
    trace = build_trace(backend, no_prompt, LR_SIZE, SIZES, prompt="Other <|image|>")
    assert trace["prompt_ids"] == encode_prompt(backend, row["lr_image"], (LR_SIZE, LR_SIZE), "Other <|image|>")


def test_bad_rows_are_clear_errors(tiny):
    _, _, backend = tiny
    rows = vlcot_rows()
    with pytest.raises(ValueError, match="target_final"):
        build_trace_dataset(backend, rows.remove_columns("target_final"), LR_SIZE, SIZES)
    empty = rows.map(lambda r, i: {"degradation_text": "" if i == 1 else r["degradation_text"]}, with_indices=True)
    with pytest.raises(ValueError, match="sample 1: 'degradation_text' is empty"):
        build_trace_dataset(backend, empty, LR_SIZE, SIZES)


# ----- the trainer's batches and loss ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traces(tiny):
    return build_trace_dataset(tiny[2], vlcot_rows(), LR_SIZE, SIZES)


def test_loss_mask_covers_the_completion_and_nothing_of_the_prompt(tiny_path, tiny, traces, tmp_path):
    tokenizer = tiny[1]
    trainer = VLCoTSFTTrainer(fresh_model(tiny_path), sft_config(tmp_path), traces, tokenizer)
    by_input = {tuple(t["prompt_ids"] + t["completion_ids"]): t for t in traces}
    seen = 0
    for batch in trainer.get_train_dataloader():  # the collated batches training actually uses
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            trace = by_input[tuple(ids[mask.bool()].tolist())]
            n_prompt, n_completion = len(trace["prompt_ids"]), len(trace["completion_ids"])
            assert (labels[:n_prompt] == -100).all()
            assert labels[n_prompt : n_prompt + n_completion].tolist() == trace["completion_ids"]
            assert (labels[n_prompt + n_completion :] == -100).all()  # padding
            seen += 1
    assert seen == len(traces)


def manual_loss(model, batch, code_mask, image_weight):
    """Weighted mean next-token NLL over the labelled tokens, from the full logits (no fused head)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    weights = torch.where(code_mask[targets.clamp(min=0)], image_weight, 1.0) * (targets != -100)
    return (nll * weights).sum() / weights.sum()


@pytest.mark.parametrize("image_weight", [0.0, 0.3, 1.0])
def test_image_loss_weight(tiny_path, tiny, traces, tmp_path, image_weight):
    tokenizer, backend = tiny[1], tiny[2]
    args = sft_config(tmp_path, image_loss_weight=image_weight, per_device_train_batch_size=4)
    trainer = VLCoTSFTTrainer(fresh_model(tiny_path), args, traces, tokenizer)
    trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    targets = batch["labels"][:, 1:]
    is_code = backend.image_code_mask[targets.clamp(min=0)] & (targets != -100)
    assert is_code.any() and ((targets != -100) & ~is_code).any()  # both kinds of token are trained
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        # the gradient-accumulation path: normalised by the weight of the whole accumulated batch
        total = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
        accumulated = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=total)
    expected = manual_loss(trainer.model, batch, backend.image_code_mask, image_weight)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(accumulated, expected, rtol=1e-4, atol=1e-5)
    if image_weight == 0.0:  # text-only loss: the image codes' predictions do not matter at all
        text_only = manual_loss(trainer.model, batch, backend.image_code_mask, 0.0)
        plain = manual_loss(trainer.model, batch, backend.image_code_mask, 1.0)
        torch.testing.assert_close(loss, text_only)
        assert abs(loss.item() - plain.item()) > 1e-3


def test_sizes_and_lengths_are_checked(tiny_path, tiny, traces, tmp_path):
    tokenizer = tiny[1]
    with pytest.raises(ValueError, match="middle_size=18 is not a multiple"):
        VLCoTSFTTrainer(fresh_model(tiny_path), sft_config(tmp_path, middle_size=18), vlcot_rows(), tokenizer)
    with pytest.raises(ValueError, match="max_length=50"):
        VLCoTSFTTrainer(fresh_model(tiny_path), sft_config(tmp_path, max_length=50), traces, tokenizer)
    with pytest.raises(ValueError, match="image_loss_weight"):
        sft_config(tmp_path, image_loss_weight=-1.0)


# ----- learning --------------------------------------------------------------------------------------------------


def format_valid_rate(model, tokenizer, prompt_ids, samples_per_prompt=2) -> float:
    """Mean format reward of low-temperature rollouts written by the rollout engine."""
    backend = load_backend(model, tokenizer)
    config = RolloutConfig(
        stage_sizes={s: (side, side) for s, side in SIZES.items()},
        max_new_tokens=400,
        do_sample=True,
        text_temperature=0.3,
        image_temperature=1.0,
    )
    model.eval()
    batch = RolloutEngine(model, backend, config).generate(
        prompt_ids, samples_per_prompt, generator=torch.Generator().manual_seed(0)
    )
    parses = parse_completions(backend, batch.completion_ids, GRIDS, decode_images=False)
    texts = [backend.decode_text(ids) for ids in batch.completion_ids]
    scores = FormatReward()(batch.prompt_ids, texts, batch.completion_ids, vlcot=parses)
    return sum(scores) / len(scores)


def test_a_few_sft_steps_teach_the_format(tiny_path, tiny, tmp_path):
    tokenizer = tiny[1]
    model = fresh_model(tiny_path)
    args = sft_config(
        tmp_path, learning_rate=3e-3, lr_scheduler_type="constant_with_warmup", warmup_steps=5, max_steps=150
    )
    trainer = VLCoTSFTTrainer(model, args, vlcot_rows(), tokenizer)
    prompts = trainer.trace_dataset["prompt_ids"]
    assert max(len(c) for c in trainer.trace_dataset["completion_ids"]) < 400
    before = format_valid_rate(model, tokenizer, prompts)
    trainer.train()
    after = format_valid_rate(model, tokenizer, prompts)
    assert before <= 0.125, before
    assert after >= 0.5, (before, after)


# ----- the script ------------------------------------------------------------------------------------------------


def run_recipe(tmp_path, monkeypatch, tiny_path, *overrides) -> Path:
    monkeypatch.setenv("VLCOT_GRPO_CACHE", str(tmp_path / "cache"))  # the demo dataset's cache
    argv = ["--config", str(RECIPE), "--model_name_or_path", str(tiny_path), "--output_dir", str(tmp_path / "out")]
    argv += ["--max_steps", "2", "--format_check_samples", "0", "--disable_tqdm", "true"]
    return main([*argv, "--build_tiny_model", "false", *overrides])


def assert_trained_copy(path: Path, tiny_path):
    model = Emu3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = fresh_model(tiny_path)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_path).get_vocab()
    load_backend(model, tokenizer)  # what GRPO does next
    lm, vq = "model.text_model.layers.0.self_attn.q_proj.weight", "model.vqmodel.quant_conv.conv.weight"
    params, before = dict(model.named_parameters()), dict(original.named_parameters())
    assert not torch.equal(params[lm], before[lm])  # trained
    assert torch.equal(params[vq], before[vq])  # the VQ tokenizer is untouched
    return model


def test_recipe_entry_point_writes_a_model_grpo_can_load(tmp_path, monkeypatch, tiny_path):
    out = run_recipe(tmp_path, monkeypatch, tiny_path)
    assert out == tmp_path / "out"
    assert_trained_copy(out, tiny_path)


def test_lora_saves_the_adapter_and_a_merged_model(tmp_path, monkeypatch, tiny_path):
    from peft import PeftModel

    out = run_recipe(tmp_path, monkeypatch, tiny_path, "--use_peft", "true", "--learning_rate", "1e-2")
    assert (out / ADAPTER_SUBDIR / "adapter_config.json").exists()
    assert not (out / "adapter_config.json").exists()  # out itself is a plain model
    merged = assert_trained_copy(out, tiny_path)
    adapted = PeftModel.from_pretrained(fresh_model(tiny_path), str(out / ADAPTER_SUBDIR))
    ids = torch.randint(0, merged.config.text_config.vocab_size, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    # the run record and card: the merged model in out/, the adapter (with its base's fingerprint) in out/adapter
    from vlcot_grpo import load_pretrained
    from vlcot_grpo.saved_settings import read_settings

    full, adapter = read_settings(out), read_settings(out / ADAPTER_SUBDIR)
    assert full["method"] == "sft" and full["adapter"] is False and adapter["adapter"] is True
    assert adapter["base_model"]["path"] == str(Path(tiny_path).resolve()) and full["lr_size"] == 32
    assert "cold-start SFT" in (out / "README.md").read_text()
    loaded, _ = load_pretrained(str(out / ADAPTER_SUBDIR), dtype="float32")  # base from adapter_config.json
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_a_stopped_cold_start_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, tiny_path, capsys):
    import json

    save = ["--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1"]
    run_recipe(tmp_path, monkeypatch, tiny_path, *save)  # stops after max_steps 2
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    capsys.readouterr()
    run_recipe(tmp_path, monkeypatch, tiny_path, *save, "--max_steps", "3", "--resume_from_checkpoint", "last")
    printed = capsys.readouterr().out
    assert printed.count("'loss'") == 1, printed  # only step 3 was trained: steps 1-2 were not rerun
    state = json.loads((tmp_path / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [row["step"] for row in state["log_history"] if "loss" in row] == [1, 2, 3]


class _Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


def _kill_at_step(monkeypatch, trainer_class, step: int):
    """The next run of ``trainer_class`` dies as step ``step`` begins (after the checkpoint before it was saved)."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step - 1:
                raise _Killed

    original = trainer_class.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Kill())

    monkeypatch.setattr(trainer_class, "__init__", init)


def test_a_killed_full_fine_tune_resumes_bit_exact(tmp_path, monkeypatch, tiny_path):
    """Killed after checkpoint-2 of 4 and resumed from 'last': the same weights and logged losses as a run that was
    never stopped (transformers' own checkpoint load silently skipped Emu3's language model here)."""
    import json

    from safetensors.torch import load_file

    save = ["--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--max_steps", "4"]
    run_recipe(tmp_path / "a", monkeypatch, tiny_path, *save)
    _kill_at_step(monkeypatch, VLCoTSFTTrainer, 3)
    with pytest.raises(_Killed):
        run_recipe(tmp_path / "b", monkeypatch, tiny_path, *save)
    monkeypatch.undo()
    assert not (tmp_path / "b" / "out" / "checkpoint-4").exists()
    run_recipe(tmp_path / "b", monkeypatch, tiny_path, *save, "--resume_from_checkpoint", "last")
    a, b = (load_file(str(tmp_path / r / "out" / "checkpoint-4" / "model.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        state = json.loads((tmp_path / run / "out" / "checkpoint-4" / "trainer_state.json").read_text())
        return [(row["step"], row["loss"]) for row in state["log_history"] if "loss" in row]

    assert losses("a") == losses("b") and [s for s, _ in losses("b")] == [1, 2, 3, 4]
