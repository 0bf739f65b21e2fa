"""GRPO and SFT through `accelerate launch`: real DeepSpeed ZeRO on the CPU (one and two ranks, with kill and resume),
and GRPO on two CPU processes over gloo. Slow: `make test-slow`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

ROOT = Path(__file__).resolve().parents[1]
# Small stages keep a chain within a short length limit; the small default tiny model keeps the run quick.
SMALL = ["--lr_size", "16", "--rough_size", "4", "--middle_size", "8", "--final_size", "16", "--tiny_model_spec", "{}"]


#: The PURE family's smallest sizes (32-pixel units): 24-token rough and middle images, a 76-token final one.
PURE_SMALL = ["--lr_size", "32", "--rough_size", "32", "--middle_size", "32", "--final_size", "64",
              "--demo_hr_size", "64", "--tiny_model_spec", "{}"]  # fmt: skip


def launch(
    tmp_path, zero: str, method: str, *extra, fails: bool = False, processes: int = 1, family: str = "emu3"
) -> str:
    """Run `accelerate launch -m vlcot_grpo.<method>` on the tiny demo recipe; returns the log, fails on an error
    (or, ``fails``, on a run that does not fail). ``zero``: a DeepSpeed config of accelerate_configs/ on
    ``processes`` CPU ranks (DeepSpeed's shared-memory communication op, built on first use), or "cpu":
    ``processes`` CPU processes over gloo without DeepSpeed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    accelerate = Path(sys.executable).with_name("accelerate")
    if zero == "cpu":  # accelerate's multi-GPU launcher starts the processes; use_cpu makes them gloo CPU ranks
        where = ["--multi_gpu", "--num_processes", str(processes), "--mixed_precision", "no"]
        device = ["--use_cpu", "true"]
    else:
        config = str(ROOT / "accelerate_configs" / f"{zero}.yaml")
        where = ["--config_file", config, "--num_processes", str(processes), "--mixed_precision", "no"]
        device = ["--use_cpu", "false" if processes == 1 else "true"]
    cmd = [
        str(accelerate), "launch", *where,
        "-m", f"vlcot_grpo.{method}", "--config", str(ROOT / "recipes" / f"tiny-{family}" / method / "config_demo.yaml"),
        "--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out"),
        "--max_steps", "2", *device, *{"emu3": SMALL, "janus": SMALL, "pure": PURE_SMALL}[family], *extra,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert (result.returncode != 0) == fails, log[-4000:]
    assert fails or zero == "cpu" or "deepspeed: True" in log, log[-2000:]
    return log


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_grpo_under_accelerate_launch_with_deepspeed(tmp_path, zero):
    # ZeRO-3 also runs the static engine on the gathered weights, its decode steps compiled (DeepSpeed's hooks on
    # every module), the LoRA adapters merged for the rollout (the default) and the projections fused (the default on
    # CUDA, forced here: the swapped modules sit among DeepSpeed's hooked ones)
    extra = ["--rollout_engine", "static", "--rollout_compile", "true", "--rollout_fuse_projections", "true"]
    extra = extra if zero == "zero3" else []
    log = launch(
        tmp_path,
        zero,
        "grpo",
        "--max_completion_length",
        "96",
        "--save_strategy",
        "no",
        "--image_log_steps",
        "1",
        *extra,
    )
    # the static engine shares the prompt cache by default
    engine = "static (decode steps compiled: True" if extra else "reference (decode steps compiled: False"
    engine += f", prompt cache shared: {bool(extra)}, projections fused: {bool(extra)})"
    assert f"rollout engine: {engine}, LoRA adapters merged for rollouts: True" in log, log[-2000:]
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() and (out / "rewards.png").exists()
    assert any((out / "samples").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_pure_family_under_accelerate_launch_with_deepspeed(tmp_path, zero, method):
    """The paper's family (tiny PURE) trains under real DeepSpeed: SFT and GRPO, ZeRO-2 and ZeRO-3 (there with the
    static engine on the gathered weights, the VQ model's included)."""
    extra = ["--save_strategy", "no"]
    if method == "grpo":
        extra += ["--max_completion_length", "260", "--image_log_steps", "1"]
        if zero == "zero3":
            extra += ["--rollout_engine", "static"]
    else:
        extra += ["--format_check_samples", "1"]
    log = launch(tmp_path, zero, method, *extra, family="pure")
    out = tmp_path / "out"
    if method == "grpo":
        assert (out / "adapter_model.safetensors").exists() and any((out / "samples").iterdir())
        assert ("rollout engine: static" if zero == "zero3" else "rollout engine: reference") in log, log[-2000:]
    else:
        from vlcot_grpo.models import load_model

        assert type(load_model(str(out))).__name__ == "PureForConditionalGeneration"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_janus_family_under_accelerate_launch_with_zero3(tmp_path, method):
    """Janus (image codes on their own table and head) under real DeepSpeed ZeRO-3: the joined embedding and logits
    gather the partitioned tables and heads; GRPO runs the static engine on the gathered weights with guidance."""
    extra = ["--save_strategy", "no"]
    if method == "grpo":
        extra += ["--max_completion_length", "96", "--image_log_steps", "1", "--rollout_engine", "static"]
        extra += ["--guidance_scale", "2.0"]
    else:
        extra += ["--format_check_samples", "1"]
    log = launch(tmp_path, "zero3", method, *extra, family="janus")
    out = tmp_path / "out"
    if method == "grpo":
        assert (out / "adapter_model.safetensors").exists() and any((out / "samples").iterdir())
        assert "rollout engine: static" in log, log[-2000:]
    else:
        from vlcot_grpo.models import load_model

        assert type(load_model(str(out))).__name__ == "JanusForVLCoT"


@pytest.mark.slow
def test_grpo_with_two_processes(tmp_path):
    """Two ranks (CPU, gloo): both wait while the main one builds the tiny model, each rolls out its own prompts
    with the static engine (the shared prompt cache on), and TRL gathers the rewards across ranks for the
    advantages; the run ends with the adapter and the reward plot written once."""
    extra = ["--rollout_engine", "static", "--max_completion_length", "96"]  # the prompt cache shared by default
    log = launch(tmp_path, "cpu", "grpo", *extra, "--save_strategy", "no", processes=2)
    assert log.count("distributed: DistributedType.MULTI_CPU, processes: 2") == 2, log[-3000:]
    assert "rollout engine: static (decode steps compiled: False, prompt cache shared: True, " in log, log[-3000:]
    assert "'train_runtime'" in log, log[-3000:]
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() and (out / "rewards.png").exists()


@pytest.mark.slow
def test_grpo_under_zero3_refuses_per_forward_gathers(tmp_path):
    """ZeRO-3 without ds3_gather_for_generation would gather the partitioned weights in every decode step's forward,
    and ranks that decode different numbers of steps would wait on each other: refused at start, naming the key."""
    log = launch(tmp_path, "zero3", "grpo", "--ds3_gather_for_generation", "false", fails=True)
    assert "ds3_gather_for_generation: false is not supported under ZeRO-3" in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_sft_under_accelerate_launch_with_deepspeed(tmp_path, zero):
    log = launch(tmp_path, zero, "sft", "--format_check_samples", "1")
    assert "format-valid rate of 1 greedy rollouts" in log, log[-2000:]
    assert AutoConfig.from_pretrained(tmp_path / "out").model_type == "emu3"  # a full model GRPO can load
    assert (tmp_path / "out" / "model.safetensors").exists()


def _weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (checkpoint / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(checkpoint / name))


def _kill_after_checkpoint_2(out: Path) -> dict:
    """The disk as a kill while checkpoint-4 was being saved leaves it: its trainer state (written last) missing,
    no final model. Returns the uninterrupted run's checkpoint-4 weights to compare the resumed run with."""
    want = _weights(out / "checkpoint-4")
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    for final in ("adapter_model.safetensors", "model.safetensors", "rewards.png"):
        (out / final).unlink(missing_ok=True)
    return want


@pytest.mark.slow
@pytest.mark.parametrize(
    "zero,lora", [("zero3", True), ("zero3", False), ("zero2", True)], ids=["z3-lora", "z3-full", "z2-lora"]
)
def test_grpo_on_two_deepspeed_ranks_resumes_exactly(tmp_path, zero, lora):
    """Two DeepSpeed ranks on the CPU: each rolls out its own prompts with the static engine (ZeRO-3: on weights
    gathered once per rollout) to its own length; killed while saving checkpoint-4 and resumed from 'last' (which
    skips the half-written checkpoint-4), the run ends with the uninterrupted run's weights."""
    steps = ["--max_steps", "4", "--save_steps", "2", "--image_log_steps", "0", "--max_completion_length", "200"]
    extra = [*steps, "--rollout_engine", "static", "--use_peft", str(lora).lower(), "--learning_rate", "1e-3"]
    log = launch(tmp_path, zero, "grpo", *extra, processes=2)
    assert log.count("distributed: DistributedType.DEEPSPEED, processes: 2, deepspeed: True") == 2, log[-3000:]
    lengths = re.findall(r"rank (\d): rolled out \d+ completions, the longest (\d+) tokens", log)
    by_rank = {rank: [int(n) for r, n in lengths if r == rank] for rank in ("0", "1")}
    assert all(len(v) == 4 for v in by_rank.values()), lengths
    assert by_rank["0"] != by_rank["1"], by_rank  # the ranks decoded different numbers of steps, and did not hang
    want = _kill_after_checkpoint_2(tmp_path / "out")
    log = launch(tmp_path, zero, "grpo", *extra, "--resume_from_checkpoint", "last", processes=2)
    assert "skipping" in log and "checkpoint-4, which is incomplete" in log, log[-3000:]
    got = _weights(tmp_path / "out" / "checkpoint-4")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero3", "zero2"])
def test_sft_on_two_deepspeed_ranks_resumes_exactly(tmp_path, zero):
    extra = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--format_check_samples", "0"]
    launch(tmp_path, zero, "sft", *extra, processes=2)
    want = _kill_after_checkpoint_2(tmp_path / "out")
    log = launch(tmp_path, zero, "sft", *extra, "--resume_from_checkpoint", "last", processes=2)
    assert "checkpoint-4, which is incomplete" in log, log[-3000:]
    got = _weights(tmp_path / "out" / "checkpoint-4")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
