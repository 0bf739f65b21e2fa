"""VLCoTGRPOTrainer: real TRL GRPO steps on the tiny model saved to disk."""

import datasets
import pytest
import torch
from transformers import AutoTokenizer, Emu3ForConditionalGeneration

from vlcot_grpo.config import VLCoTGRPOConfig
from vlcot_grpo.models import CODE
from vlcot_grpo.trainer import VLCoTGRPOTrainer
from vlcot_grpo.vlcot import VLCoTParse

SIZES = {"lr_size": 16, "rough_size": 8, "middle_size": 16, "final_size": 32}


@pytest.fixture(scope="module")
def dataset():
    import skimage.data
    from PIL import Image

    photos = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.chelsea())]
    return datasets.Dataset.from_dict(
        {
            "lr_image": [p.resize((16, 16)) for p in photos],
            "hr_image": [p.resize((32, 32)) for p in photos],
            "tags": [["astronaut", "flag"], ["cat"]],
            "caption": ["An astronaut.", "A cat."],
        }
    )


def _args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_completion_length=96,
        num_generations=4,
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        image_log_steps=1,
        image_log_samples=2,
        activation_checkpointing=False,
        seed=0,
        **SIZES,
    )
    base.update(overrides)
    return VLCoTGRPOConfig(**base)


def _load(path):
    return Emu3ForConditionalGeneration.from_pretrained(path), AutoTokenizer.from_pretrained(path)


class Recorder:
    """A reward that records what it was given; returns the completion length so advantages are non-zero."""

    __name__ = "recorder"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append(kwargs)
        return [len(ids) / 100 for ids in completion_ids]


@pytest.mark.parametrize(
    "use_lora,beta", [(True, 0.0), (True, 0.1), (False, 0.0), (False, 0.1)], ids=["lora", "lora-kl", "full", "full-kl"]
)
def test_two_training_steps(tiny_path, dataset, tmp_path, use_lora, beta):
    from peft import LoraConfig

    model, tokenizer = _load(tiny_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "text_model" in n or "lm_head" in n}
    peft_config = (
        LoraConfig(r=4, lora_alpha=8, target_modules=r".*text_model.*\.(q_proj|v_proj)") if use_lora else None
    )
    reward = Recorder()
    trainer = VLCoTGRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=_args(tmp_path, beta=beta),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    assert trainer.state.global_step == 2 and len(reward.calls) == 2
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in logs)
    assert all("vlcot/format_valid_rate" in row and "timing/rollout_seconds" in row for row in logs)
    if beta > 0:
        assert all("kl" in row for row in logs)
    trained = trainer.model
    if use_lora:
        lora = [p for n, p in trained.named_parameters() if "lora_B" in n]
        assert lora and any(p.abs().sum() > 0 for p in lora)  # B starts at zero: it moved
        base = dict(trained.get_base_model().named_parameters())
        assert all(torch.equal(base[n], before[n]) for n in before if n in base)
    else:
        now = dict(trained.named_parameters())
        assert any(not torch.equal(now[n], before[n]) for n in before)
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir())[:1] == ["step000001_sample0.png"]


def test_rewards_receive_the_parsed_chain_and_stage_images(tiny_path, dataset, tmp_path):
    model, tokenizer = _load(tiny_path)
    # make image blocks frequent so there are stage images to check
    tag_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<rough_image>", "<middle_image>", "<final_image>")]
    model.lm_head.register_forward_hook(
        lambda m, i, out: out.index_add(-1, torch.tensor(tag_ids), torch.full((*out.shape[:-1], 3), 6.0))
    )
    reward = Recorder()
    trainer = VLCoTGRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=_args(tmp_path, max_steps=1, max_completion_length=400),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    kwargs = reward.calls[0]
    assert {"vlcot", "stage_texts", "stage_images", "lr_image", "hr_image", "tags", "caption", "trainer_state"} <= set(
        kwargs
    )
    assert len(kwargs["vlcot"]) == 4 and all(isinstance(p, VLCoTParse) for p in kwargs["vlcot"])
    seen = 0
    for images in kwargs["stage_images"]:
        for stage, image in images.items():
            if image is not None:
                seen += 1
                assert image.size == (SIZES[f"{stage}_size"],) * 2
    assert seen >= 2
    assert kwargs["tags"][0] in (["astronaut", "flag"], ["cat"])


@pytest.mark.parametrize("codes_in_loss", [True, False])
def test_forced_tokens_are_out_of_the_loss(tiny_path, dataset, tmp_path, codes_in_loss):
    model, tokenizer = _load(tiny_path)
    tag_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<rough_image>", "<middle_image>", "<final_image>")]
    model.lm_head.register_forward_hook(
        lambda m, i, out: out.index_add(-1, torch.tensor(tag_ids), torch.full((*out.shape[:-1], 3), 6.0))
    )
    trainer = VLCoTGRPOTrainer(
        model=model,
        reward_funcs=[Recorder()],
        args=_args(tmp_path, max_completion_length=300, image_codes_in_loss=codes_in_loss),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    rows = [dict(dataset[0], prompt=trainer.args.prompt_template) for _ in range(4)]
    out = trainer._generate_and_score_completions(rows)
    loss_mask = (out["completion_mask"] * out["tool_mask"]).tolist()
    backend = trainer.backend
    checked = 0
    for ids, mask in zip(out["completion_ids"].tolist(), loss_mask):
        in_image = None
        for pos, tok in enumerate(ids):
            if in_image is None and tok in tag_ids:  # an image opens: walk its template
                stage = ("rough", "middle", "final")[tag_ids.index(tok)]
                template = backend.image_template(*trainer.stage_grids[stage]).tolist()
                template.append(backend.tag_ids[f"</{stage}_image>"])
                in_image, k = template, 0
                assert mask[pos] == 1  # the opening tag was the model's choice
                continue
            if in_image is not None:
                if k < len(in_image) and pos < len(ids) and out["completion_mask"][0].numel() > pos:
                    if ids[pos] != tokenizer.pad_token_id:
                        assert mask[pos] == (1 if in_image[k] == CODE and codes_in_loss else 0), (stage, k)
                        checked += 1
                k += 1
                if k == len(in_image):
                    in_image = None
    assert checked > 50


@pytest.mark.parametrize("family", ["emu3", "janus"])
@pytest.mark.parametrize("support", ["restricted", "full"])
def test_logps_equal_manual_forward_over_the_same_support(request, dataset, tmp_path, support, family):
    """Also on Janus, whose code logits come from their own head: the joined logits are what is scored."""
    from vlcot_grpo.models import load_model

    path = request.getfixturevalue("tiny_path" if family == "emu3" else f"tiny_{family}_path")
    model, tokenizer = load_model(str(path)), AutoTokenizer.from_pretrained(path)
    args = _args(tmp_path, logprob_support=support, sampler_correction="none", temperature=0.7, image_temperature=1.3)
    trainer = VLCoTGRPOTrainer(
        model=model, reward_funcs=[Recorder()], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    backend = trainer.backend
    g = torch.Generator().manual_seed(0)
    codes = torch.nonzero(backend.image_code_mask).squeeze(-1)
    text = torch.nonzero(backend.text_token_mask).squeeze(-1)
    completion = torch.stack(
        [
            torch.cat(
                [
                    codes[torch.randint(len(codes), (6,), generator=g)],
                    text[torch.randint(len(text), (6,), generator=g)],
                ]
            )
            for _ in range(2)
        ]
    )
    prompt = torch.randint(0, 100, (2, 9), generator=g)
    ids = torch.cat([prompt, completion], 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    ours, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 12)

    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = trainer.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -13:-1]
    expected = torch.zeros(2, 12)
    for b in range(2):
        for t in range(12):
            target = int(completion[b, t])
            is_code = bool(backend.image_code_mask[target])
            row = logits[b, t] / (1.3 if is_code else 0.7)
            if support == "restricted":
                allowed = backend.image_code_mask if is_code else backend.text_token_mask
                row = row.masked_fill(~allowed, float("-inf"))
            expected[b, t] = torch.log_softmax(row, -1)[target]
    assert torch.allclose(ours, expected, atol=1e-5)


def test_bad_dataset_and_sizes_fail_at_start(tiny_path, dataset, tmp_path):
    model, tokenizer = _load(tiny_path)
    with pytest.raises(ValueError, match="lr_image"):
        VLCoTGRPOTrainer(
            model=model,
            reward_funcs=[Recorder()],
            args=_args(tmp_path),
            train_dataset=dataset.remove_columns("lr_image"),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="30x30.*downsample factor 4"):
        VLCoTGRPOTrainer(
            model=model,
            reward_funcs=[Recorder()],
            args=_args(tmp_path, final_size=30),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def digit_reward(prompts, completions, completion_ids, **kwargs):
    """Toy reward: the share of digits in the first 24 characters of the text."""
    return [sum(ch.isdigit() for ch in text[:24]) / 24 for text in completions]


def test_learning_the_rl_loop_really_learns(tiny_path, dataset, tmp_path):
    model, tokenizer = _load(tiny_path)
    args = _args(
        tmp_path,
        max_steps=14,
        num_generations=8,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        max_completion_length=24,
        image_log_steps=0,
        beta=0.0,
    )
    trainer = VLCoTGRPOTrainer(
        model=model, reward_funcs=[digit_reward], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    rewards = [
        row["rewards/digit_reward/mean"] for row in trainer.state.log_history if "rewards/digit_reward/mean" in row
    ]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print("learning curve", [round(r, 3) for r in rewards])
    assert last > first + 0.15, rewards


# ----- LoRA adapters merged for the rollout ---------------------------------------------------------------------------
def _adapted(path, dtype):
    """The tiny model with LoRA adapters whose B is random (PEFT's default B = 0 would make merging a no-op)."""
    from peft import LoraConfig, get_peft_model

    model = Emu3ForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*text_model.*\.(q_proj|v_proj|down_proj)")
    lora.init_lora_weights = False
    return get_peft_model(model, lora)


def test_merged_adapters_restore_exact_base_weights(tiny_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from vlcot_grpo.adapters import merged_adapters

    model = _adapted(tiny_path, torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    bases = [layer.get_base_layer().weight for layer in layers]
    before = [w.detach().clone() for w in bases]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with merged_adapters(model):
            assert all(layer.merged for layer in layers)
            assert not all(torch.equal(w, b) for w, b in zip(bases, before))  # the deltas really went in
            merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=0.05, rtol=0.05)  # bf16: merging rounds differently
    assert not any(layer.merged for layer in layers)
    assert all(torch.equal(w, b) for w, b in zip(bases, before))
    # what the exact copy-back is for: PEFT's own merge/unmerge does not return bf16 weights bit for bit
    model.merge_adapter()
    model.unmerge_adapter()
    assert not all(torch.equal(w, b) for w, b in zip(bases, before))


def test_merged_adapters_refuse_partitioned_weights_and_restore_on_error(tiny_path):
    from vlcot_grpo.adapters import merged_adapters

    model = _adapted(tiny_path, torch.float32)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), merged_adapters(model):
        raise RuntimeError("boom")  # a rollout that fails still gives the exact weights back
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
    layer = next(m for m in model.modules() if hasattr(m, "get_base_layer") and hasattr(m, "merged"))
    layer.get_base_layer().weight.data = torch.empty(0)  # what a ZeRO-3 partition looks like outside the gather
    with pytest.raises(ValueError, match="ds3_gather_for_generation"), merged_adapters(model):
        pass


def test_quantized_base_is_found_and_not_merged(tiny_path, dataset, tmp_path):
    """QLoRA bases (integer storage, as bitsandbytes keeps 4/8-bit weights) are named, and merging them is refused;
    the trainer, whose rollout_merge_adapters is on by default, then rolls out on the unmerged adapters."""
    from vlcot_grpo.adapters import merged_adapters, quantized_base

    model = _adapted(tiny_path, torch.float32)
    args = _args(tmp_path)
    assert args.rollout_merge_adapters  # the default
    trainer = VLCoTGRPOTrainer(model, [Recorder()], args, dataset, AutoTokenizer.from_pretrained(tiny_path))
    assert quantized_base(trainer.model) is None and trainer.merges_adapters_for_rollouts
    layer = next(m for m in model.modules() if hasattr(m, "get_base_layer") and hasattr(m, "merged"))
    weight = layer.get_base_layer().weight
    layer.get_base_layer().weight = torch.nn.Parameter(weight.detach().to(torch.int8), requires_grad=False)
    assert quantized_base(model) == "Linear.weight (torch.int8)"
    with pytest.raises(ValueError, match="quantized"), merged_adapters(model):
        pass
    trainer = VLCoTGRPOTrainer(model, [Recorder()], args, dataset, AutoTokenizer.from_pretrained(tiny_path))
    assert not trainer.merges_adapters_for_rollouts


def test_trainer_rolls_out_merged_and_trains_the_adapters(tiny_path, dataset, tmp_path):
    """rollout_merge_adapters: the rollout runs on merged weights, training still updates the adapters, the base
    weights end bit-identical, and a merged greedy rollout of the trained model equals the unmerged one (fp32)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from vlcot_grpo.adapters import merged_adapters
    from vlcot_grpo.rollout import RolloutConfig, RolloutEngine

    lora = {"r": 4, "lora_alpha": 8, "target_modules": r".*text_model.*\.(q_proj|v_proj)"}
    seen = {}
    for merge in (False, True):
        model, tokenizer = _load(tiny_path)
        args = _args(tmp_path / str(merge), rollout_merge_adapters=merge, max_steps=2, image_log_steps=0)
        trainer = VLCoTGRPOTrainer(
            model=model,
            reward_funcs=[Recorder()],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(**lora),
        )
        layers = [m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer)]
        base = {id(m): m.get_base_layer().weight.detach().clone() for m in layers}
        states, outputs = [], []

        def record(*a, _generate=trainer.engine.generate, _layers=layers, _states=states, _outputs=outputs, **k):
            _states.append([m.merged for m in _layers])
            _outputs.append(_generate(*a, **k))
            return _outputs[-1]

        trainer.engine.generate = record
        trainer.train()
        assert states and all(all(s) == merge and any(s) == merge for s in states)
        assert all(torch.equal(m.get_base_layer().weight, base[id(m)]) for m in layers)
        assert not any(m.merged for m in layers)
        # the adapters learned (B starts at 0 and moved), and the merged rollout after training matches unmerged
        assert any(m.lora_B["default"].weight.abs().sum() > 0 for m in layers)
        seen[merge] = outputs[0].completion_ids
        if merge:
            config = RolloutConfig(stage_sizes=args.stage_sizes, max_new_tokens=60, do_sample=False)
            engine = RolloutEngine(trainer.model, trainer.backend, config)
            prompt = [[5, 6, 7, 8]]
            plain = engine.generate(prompt, 2).completion_ids
            with merged_adapters(trainer.model):
                assert engine.generate(prompt, 2).completion_ids == plain
    # B = 0 at the first rollout: merging changes nothing, so the seeded first rollouts agree exactly
    assert seen[True] == seen[False]


def test_merged_adapters_reuse_their_host_buffers(tiny_path):
    from vlcot_grpo.adapters import merged_adapters

    model = _adapted(tiny_path, torch.float32)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {}
    with merged_adapters(model, buffers):
        pass
    first = {k: v.data_ptr() for k, v in buffers.items()}
    with merged_adapters(model, buffers):
        assert not all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
    assert first and {k: v.data_ptr() for k, v in buffers.items()} == first
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


# ----- the direction of one step --------------------------------------------------------------------------------------
def code_share_reward(code_ids: set[int]):
    """A reward that differs between the chains of a random model: the share of image-code tokens."""

    def code_share(prompts, completions, completion_ids, **kwargs):
        return [sum(int(t) in code_ids for t in ids) / max(len(ids), 1) for ids in completion_ids]

    return code_share


class StepProbe(VLCoTGRPOTrainer):
    """Keeps the first batch it rolls out and each chain's log-prob under the policy before the step."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not hasattr(self, "probe"):
            self.probe = output, self.chain_logps(output)
        return output

    def chain_logps(self, output):
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
        self._scoring = output  # the sampled top-k the guided log-probs are scored with
        try:
            with torch.no_grad():
                logps, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, ids, mask, output["completion_ids"].size(1)
                )
        finally:
            self._scoring = None
        return (logps * output["completion_mask"]).sum(1)


def test_one_step_raises_the_chains_with_positive_advantage(tiny_path, dataset, tmp_path):
    """Through the whole VLCoT path (LoRA merged for the rollout, image codes drawn with entropy top-k under the
    guided sampler correction), one GRPO step moves each chain's log-prob the way its advantage says: the
    advantage-weighted change is positive and the chains above the group mean gain more than those below."""
    from peft import LoraConfig

    from vlcot_grpo.models import load_backend

    model, tokenizer = _load(tiny_path)
    code_ids = set(torch.nonzero(load_backend(model, tokenizer).image_code_mask).flatten().tolist())
    args = _args(
        tmp_path,
        max_steps=1,
        num_generations=8,
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        image_log_steps=0,
        image_top_k=-1,
        image_temperature=1.0,
        beta=0.0,
    )
    assert args.sampler_correction == "guided" and args.rollout_merge_adapters
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*text_model.*\.(q_proj|v_proj|down_proj)")
    trainer = StepProbe(
        model=model, reward_funcs=[code_share_reward(code_ids)], args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora,
    )  # fmt: skip
    trainer.train()
    output, before = trainer.probe
    change = trainer.chain_logps(output) - before
    advantages = output["advantages"]
    advantages = advantages if advantages.dim() == 1 else advantages[:, 0]
    assert (advantages != 0).any(), advantages
    assert float((advantages * change).sum()) > 0, (advantages, change)
    assert change[advantages > 0].mean() > change[advantages < 0].mean(), (advantages, change)
