"""LoRA that learns the VLCoT tags, QLoRA for real, and the ModelConfig fields the scripts refuse: on the prepared
Emu3 look-alike, through the scripts' own loader (`load_policy`) and LoRA config (`peft_config_for`)."""

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from vlcot_grpo import grpo, sft
from vlcot_grpo.models import Emu3Backend, JanusBackend, PureBackend, check_vlcot_tokens, load_model
from vlcot_grpo.rollout import has_quantized_weights
from vlcot_grpo.script_utils import load_policy, load_train_dataset, peft_config_for

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["--lr_size", "16", "--rough_size", "8", "--middle_size", "16", "--final_size", "32"]
CPU = ["--bf16", "false", "--use_cpu", "true", "--dtype", "float32", "--report_to", "none", "--save_strategy", "no"]


def _sft_args(model_path, tmp_path, *extra):
    argv = ["--model_name_or_path", str(model_path), "--output_dir", str(tmp_path / "sft"), "--dataset_name", "demo",
            "--demo_hr_size", "32", *SIZES, *CPU, "--per_device_train_batch_size", "2", *extra]  # fmt: skip
    return sft.parse_args(argv)


def _tag_rows(layer, ids):
    """The tag rows ``layer`` computes with (PEFT's wrapper gives its weight with the trained rows merged in)."""
    return layer.weight[ids].detach().clone()


# ----- LoRA and the tags -----------------------------------------------------------------------------------------


def test_lora_trains_the_tag_rows_and_the_adapter_restores_them(prepared_path, tmp_path):
    script_args, training_args, model_args = _sft_args(
        prepared_path, tmp_path, "--use_peft", "true", "--lora_r", "4", "--max_steps", "2", "--learning_rate", "1e-2"
    )
    model, tokenizer = load_policy(model_args, training_args, script_args)
    ids = sorted(check_vlcot_tokens(tokenizer).values())
    base_embed, base_head = _tag_rows(model.get_input_embeddings(), ids), _tag_rows(model.get_output_embeddings(), ids)
    config = peft_config_for(model_args, model, tokenizer)
    assert config.trainable_token_indices == {"model.text_model.embed_tokens": ids, "lm_head": ids}
    trainer = sft.VLCoTSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=load_train_dataset(script_args, training_args),
        processing_class=tokenizer,
        peft_config=config,
    )
    embed, head = trainer.model.get_input_embeddings(), trainer.model.get_output_embeddings()

    # the tags' rows get a gradient from SFTTrainer's loss (TRL's fused head reads the wrapper's merged weight)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, batch).backward()
    for layer in (embed, head):
        grad = layer.token_adapter.trainable_tokens_delta["default"].grad
        assert grad.shape == (len(ids), model.config.text_config.hidden_size)
        assert (grad.abs().sum(-1) > 0).all(), grad.abs().sum(-1)  # every tag's row
    trainer.model.zero_grad()

    trainer.train()
    trained_embed, trained_head = _tag_rows(embed, ids), _tag_rows(head, ids)
    assert not torch.allclose(trained_embed, base_embed) and not torch.allclose(trained_head, base_head)
    out = sft.save_for_grpo(trainer, tokenizer, prepared_path)

    # the adapter holds the 14 rows of each matrix, never a whole matrix, and stays smaller than one of them
    adapter = out / sft.ADAPTER_SUBDIR / "adapter_model.safetensors"
    vocab, hidden = model.get_input_embeddings().weight.shape
    with safe_open(adapter, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    deltas = {k: s for k, s in shapes.items() if "trainable_tokens_delta" in k}
    assert len(deltas) == 2 and set(deltas.values()) == {(len(ids), hidden)}, deltas
    assert all(s[0] != vocab for s in shapes.values()), shapes
    assert adapter.stat().st_size < vocab * hidden * 4

    # loaded onto a fresh base, the adapter gives back the trained rows; the merged model GRPO loads has them too
    restored = PeftModel.from_pretrained(load_model(str(prepared_path)), str(out / sft.ADAPTER_SUBDIR))
    assert torch.equal(_tag_rows(restored.get_input_embeddings(), ids), trained_embed)
    assert torch.equal(_tag_rows(restored.get_output_embeddings(), ids), trained_head)
    merged = load_model(str(out))
    assert torch.equal(merged.get_input_embeddings().weight[ids], trained_embed)
    assert torch.equal(merged.get_output_embeddings().weight[ids], trained_head)
    others = [i for i in range(vocab) if i not in ids]
    base = load_model(str(prepared_path))
    assert torch.equal(merged.get_input_embeddings().weight[others], base.get_input_embeddings().weight[others])


def test_a_layer_trained_whole_gets_no_token_rows(prepared_path, tmp_path):
    script_args, training_args, model_args = _sft_args(
        prepared_path, tmp_path, "--use_peft", "true", "--lora_modules_to_save", "lm_head"
    )
    model, tokenizer = load_policy(model_args, training_args, script_args)
    config = peft_config_for(model_args, model, tokenizer)
    assert list(config.trainable_token_indices) == ["model.text_model.embed_tokens"]


# ----- QLoRA -----------------------------------------------------------------------------------------------------


def _cpu_args(deepspeed=None):
    """The bits of a training config the loader reads, for one CPU process."""
    return SimpleNamespace(device=torch.device("cpu"), model_init_kwargs=None, deepspeed=deepspeed)


@pytest.mark.parametrize("bits, layer", [(4, bnb.nn.Linear4bit), (8, bnb.nn.Linear8bitLt)])
def test_quantized_base_really_is_quantized(prepared_path, tmp_path, bits, layer):
    script_args, training_args, model_args = _sft_args(
        prepared_path, tmp_path, "--use_peft", "true", f"--load_in_{bits}bit", "true"
    )
    model, _ = load_policy(model_args, _cpu_args(), script_args)
    attention = model.model.text_model.layers[0].self_attn
    assert all(type(getattr(attention, p)) is layer for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert type(model.model.text_model.layers[-1].mlp.down_proj) is layer
    # the VQ model and the head stay in full precision (Emu3Backend.full_precision_modules)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.model.vqmodel.modules())
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert attention.q_proj.weight.dtype in (torch.uint8, torch.int8) and has_quantized_weights(model)
    assert getattr(model, f"is_loaded_in_{bits}bit")


@pytest.mark.parametrize("bits", [8])  # 4 bits: test_real_model_path runs the README's QLoRA recipe, same checks
def test_qlora_grpo_step_on_cpu(prepared_path, tmp_path, caplog, bits):
    caplog.set_level(logging.INFO, logger="vlcot_grpo")
    argv = [
        "--config", str(ROOT / "recipes" / "tiny-emu3" / "grpo" / "config_demo.yaml"), "--model_name_or_path",
        str(prepared_path), "--build_tiny_model", "false", "--output_dir", str(tmp_path / "out"), *SIZES, *CPU,
        "--demo_hr_size", "32", "--max_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "2",
        "--max_completion_length", "160", "--image_log_steps", "0", "--rewards", "format", "--reward_weights", "1",
        f"--load_in_{bits}bit", "true",
    ]  # fmt: skip
    out = grpo.main(argv)
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("quantized base") and ("Linear4bit" if bits == 4 else "Linear8bitLt") in m for m in messages
    )
    # quantized weights: the reference engine, adapters never merged into them (the README's rollout path)
    assert any(
        m.startswith("rollout engine: reference") and m.endswith("merged for rollouts: False") for m in messages
    )
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert sum("trainable_tokens_delta" in k for k in f.keys()) == 2


# ----- what the scripts refuse -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--load_in_4bit", "true"], "load_in_4bit: a quantized base trains only through adapters"),
        (["--load_in_8bit", "true"], "load_in_8bit: a quantized base trains only through adapters"),
        (["--lora_r", "8"], "lora_r=8 is a LoRA setting but use_peft is false"),
        (["--lora_target_modules", "q_proj"], "lora_target_modules='q_proj' is a LoRA setting"),
        (["--bnb_4bit_quant_type", "fp4"], "bnb_4bit_quant_type='fp4' is a 4-bit setting but load_in_4bit is false"),
        (["--use_peft", "true", "--lora_task_type", "SEQ_CLS"], "lora_task_type='SEQ_CLS'"),
    ],
)
def test_model_config_that_would_be_ignored_is_refused(prepared_path, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sft.main(["--model_name_or_path", str(prepared_path), "--output_dir", str(tmp_path / "o"), *CPU, *extra])


def test_a_model_config_field_the_scripts_do_not_read_is_named(prepared_path, tmp_path, monkeypatch):
    from vlcot_grpo import script_utils

    monkeypatch.setattr(script_utils, "HONOURED_MODEL_FIELDS", script_utils.HONOURED_MODEL_FIELDS - {"use_dora"})
    script_args, training_args, model_args = _sft_args(
        prepared_path, tmp_path, "--use_peft", "true", "--use_dora", "true"
    )
    with pytest.raises(ValueError, match="use_dora=True: the VLCoT scripts do not honour this ModelConfig field"):
        load_policy(model_args, training_args, script_args)


def test_quantisation_that_cannot_be_done_is_an_error(prepared_path, tmp_path, monkeypatch):
    script_args, _, model_args = _sft_args(prepared_path, tmp_path, "--use_peft", "true", "--load_in_4bit", "true")
    with pytest.raises(ValueError, match="load_in_4bit under DeepSpeed is not supported"):
        load_policy(model_args, _cpu_args(deepspeed="zero3.json"), script_args)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "bitsandbytes", None)
        with pytest.raises(ValueError, match="load_in_4bit needs bitsandbytes"):
            load_policy(model_args, _cpu_args(), script_args)
    # nothing left to quantize (every module kept in full precision): refused, never trained in full precision
    monkeypatch.setattr(Emu3Backend, "full_precision_modules", ("model", "lm_head"))
    with pytest.raises(
        RuntimeError, match="load_in_4bit: no layer of .* was quantized.*refusing a full-precision run"
    ):
        load_policy(model_args, _cpu_args(), script_args)


def test_model_revision_reaches_from_pretrained(prepared_path, tmp_path, monkeypatch):
    import vlcot_grpo.models

    seen = {}
    load = vlcot_grpo.models.load_model
    monkeypatch.setattr(vlcot_grpo.models, "load_model", lambda path, **kw: seen.update(kw) or load(path, **kw))
    script_args, training_args, model_args = _sft_args(prepared_path, tmp_path, "--model_revision", "v1.0")
    load_policy(model_args, training_args, script_args)
    assert seen["revision"] == "v1.0"


def test_an_unprepared_checkpoint_is_refused_naming_the_step(lookalike_path, tmp_path):
    with pytest.raises(ValueError, match=rf"{lookalike_path}: .*'<degradation>'.*vlcot-grpo prepare --model SRC"):
        sft.main(["--model_name_or_path", str(lookalike_path), "--output_dir", str(tmp_path / "o"), *CPU])


def test_pure_qlora_quantizes_the_language_model_only_and_trains_the_tag_rows(pure_prepared_path, tmp_path):
    """The paper's family: 4-bit language-model layers, LlamaGen's VQ model and the head in full precision
    (PureBackend.full_precision_modules), LoRA on the language model and the tags' rows trainable."""
    script_args, training_args, model_args = _sft_args(
        pure_prepared_path, tmp_path, "--use_peft", "true", "--load_in_4bit", "true",
        "--lr_size", "32", "--rough_size", "32", "--middle_size", "64", "--final_size", "96",
    )  # fmt: skip
    model, tokenizer = load_policy(model_args, _cpu_args(), script_args)
    attention = model.model.layers[0].self_attn
    assert all(type(getattr(attention, p)) is bnb.nn.Linear4bit for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.image_tokenizer.modules())
    assert type(model.lm_head) is torch.nn.Linear
    ids = sorted(check_vlcot_tokens(tokenizer).values())
    config = peft_config_for(model_args, model, tokenizer)
    assert config.trainable_token_indices == {"model.embed_tokens": ids, "lm_head": ids}
    assert config.target_modules == PureBackend.lora_target_modules


def test_janus_qlora_keeps_the_image_path_exact_and_trains_through_both_heads(janus_prepared_path, tmp_path):
    """Janus-Pro: 4-bit language-model layers; the VQ model, the codes' table, aligner and head, and the text head in
    full precision (JanusBackend.full_precision_modules); LoRA on the language model only; then a QLoRA SFT step, whose
    loss is scored from the model's own joined logits (text and image head), trains the adapters."""
    script_args, training_args, model_args = _sft_args(
        janus_prepared_path, tmp_path, "--use_peft", "true", "--load_in_4bit", "true", "--max_steps", "2",
        "--lr_size", "32", "--learning_rate", "1e-2", "--logging_steps", "1",
    )  # fmt: skip
    model, tokenizer = load_policy(model_args, _cpu_args(), script_args)
    attention = model.model.language_model.layers[0].self_attn
    assert all(type(getattr(attention, p)) is bnb.nn.Linear4bit for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    janus = model.model
    for module in (janus.vqmodel, janus.generation_embeddings, janus.generation_aligner, janus.generation_head):
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())
    assert type(model.lm_head) is torch.nn.Linear
    ids = sorted(check_vlcot_tokens(tokenizer).values())
    config = peft_config_for(model_args, model, tokenizer)
    assert config.target_modules == JanusBackend.lora_target_modules
    assert set(config.trainable_token_indices) <= {"model.language_model.embed_tokens", "lm_head"}
    assert all(v == ids for v in config.trainable_token_indices.values())

    out = sft.main(
        ["--model_name_or_path", str(janus_prepared_path), "--output_dir", str(tmp_path / "run"), "--dataset_name",
         "demo", "--demo_hr_size", "32", "--lr_size", "32", "--rough_size", "8", "--middle_size", "16",
         "--final_size", "32", *CPU, "--per_device_train_batch_size", "2", "--use_peft", "true", "--load_in_4bit",
         "true", "--max_steps", "2", "--learning_rate", "1e-2", "--format_check_samples", "0"]
    )  # fmt: skip
    adapter = Path(out) / "adapter"
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        lora = [k for k in f.keys() if "lora_" in k]
        assert lora and all(".language_model.layers." in k for k in lora)
        assert any("lora_B" in k and f.get_tensor(k).abs().sum() > 0 for k in lora)  # the step trained them
