"""sampler_correction: the trained log-probs against the rollout's sampling log-probs (guided: equal; none: not),
the importance weights against the exact policy gradient of a bandit, and the generation options the rollout
refuses."""

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from vlcot_grpo.config import VLCoTGRPOConfig
from vlcot_grpo.logprobs import importance_weights
from vlcot_grpo.models import load_backend, load_model
from vlcot_grpo.sampling import code_scores
from vlcot_grpo.trainer import VLCoTGRPOTrainer

SIZES = {"lr_size": 16, "rough_size": 8, "middle_size": 16, "final_size": 32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forwards on two shared cores: one intra-op thread is much faster (as in test_fast_rollout)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def dataset():
    import skimage.data
    from PIL import Image

    photos = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.chelsea())]
    return datasets.Dataset.from_dict({"lr_image": [p.resize((16, 16)) for p in photos], "tags": [["a"], ["cat"]]})


def _args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_completion_length=200,
        num_generations=4,
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        image_log_steps=0,
        activation_checkpointing=False,
        seed=0,
        **SIZES,
    )
    base.update(overrides)
    return VLCoTGRPOConfig(**base)


def _length_reward(prompts, completions, completion_ids, **kwargs):
    return [len(ids) / 100 for ids in completion_ids]


def _trainer(tiny_path, dataset, tmp_path, **overrides):
    """The tiny model with sharpened logits (so top-k cuts the 256 codes) and +6 on the image-opening tags (so rows
    write images)."""
    model = load_model(str(tiny_path))
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    backend = load_backend(model, tokenizer)
    tags = [tokenizer.convert_tokens_to_ids(f"<{s}_image>") for s in ("rough", "middle", "final")]
    bias = torch.zeros(backend.vocab_size)
    bias[tags] = 30.0

    def hook(module, inputs, output):
        return output * 25.0 + bias.to(output.dtype)

    backend.logits_module.register_forward_hook(hook)
    return VLCoTGRPOTrainer(
        model=model,
        reward_funcs=[_length_reward],
        args=_args(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def _logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


@pytest.mark.parametrize(
    "guidance,top_k",
    [(1.0, 0), (1.0, -1), (3.0, 0), (0.8, -1), (3.0, 12)],
    ids=["plain", "topk", "cfg", "paper", "cfg-k"],
)
def test_guided_trains_the_log_probs_that_were_sampled(tiny_path, dataset, tmp_path, guidance, top_k):
    """fp32 on the CPU: the loss's log-probs equal the rollout's sampling log-probs for every sampled token."""
    trainer = _trainer(tiny_path, dataset, tmp_path, guidance_scale=guidance, image_top_k=top_k, top_k=20)
    trainer.train()
    gap = _logged(trainer, "sampling/sampling_logp_difference/max")
    assert gap and gap[0] < 2e-4
    assert _logged(trainer, "vlcot/tokens_rough_image")[0] > 0  # images were written, so codes were scored
    if top_k == -1:
        assert 14 <= _logged(trainer, "vlcot/image_top_k")[0] < 256  # the rule's k, cutting the 256 codes


@pytest.mark.parametrize("guidance,top_k", [(1.0, 0), (3.0, 12), (0.8, -1)], ids=["plain", "cfg-k", "paper"])
def test_guided_trains_the_log_probs_that_were_sampled_on_janus(tiny_janus_path, dataset, tmp_path, guidance, top_k):
    """The same on Janus: codes embedded by their own table and scored by their own head, in one forward with the
    unconditional rows; the trainer's log-probs come from the joined logits."""
    trainer = _trainer(tiny_janus_path, dataset, tmp_path, guidance_scale=guidance, image_top_k=top_k, top_k=20)
    trainer.train()
    gap = _logged(trainer, "sampling/sampling_logp_difference/max")
    assert gap and gap[0] < 2e-4
    assert _logged(trainer, "vlcot/tokens_rough_image")[0] > 0


@pytest.mark.parametrize("guidance,top_k", [(3.0, 12), (0.8, -1)], ids=["cfg-k", "paper"])
def test_guided_trains_the_log_probs_that_were_sampled_on_pure(tiny_pure_path, dataset, tmp_path, guidance, top_k):
    """The same on the paper's family (PURE layout, sizes in 32-pixel units): one head, full logits."""
    sizes = {"lr_size": 32, "rough_size": 32, "middle_size": 32, "final_size": 64}
    trainer = _trainer(
        tiny_pure_path, dataset, tmp_path, guidance_scale=guidance, image_top_k=top_k, top_k=20, **sizes
    )
    trainer.train()
    gap = _logged(trainer, "sampling/sampling_logp_difference/max")
    assert gap and gap[0] < 2e-4
    assert _logged(trainer, "vlcot/tokens_rough_image")[0] > 0


def test_none_leaves_the_gap_that_guided_closes(tiny_path, dataset, tmp_path):
    """The paper's choice: the conditional log-probs are not what guidance and top-k sampled from."""
    trainer = _trainer(tiny_path, dataset, tmp_path, guidance_scale=3.0, image_top_k=-1, sampler_correction="none")
    trainer.train()
    assert _logged(trainer, "sampling/sampling_logp_difference/mean")[0] > 0.1


def test_importance_weights_fold_into_the_advantages(tiny_path, dataset, tmp_path):
    trainer = _trainer(
        tiny_path, dataset, tmp_path, guidance_scale=3.0, image_top_k=-1, sampler_correction="importance"
    )
    rows = [dict(dataset[0], prompt=trainer.args.prompt_template) for _ in range(4)]
    out = trainer._generate_and_score_completions(rows)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    width = out["completion_ids"].size(1)
    with torch.no_grad():  # the conditional log-probs (importance leaves them uncorrected)
        cond, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, width)
    mask = out["completion_mask"] * out["tool_mask"]
    weights, clipped = importance_weights(cond, out["sampling_per_token_logps"], mask, "token_truncate", None, 3.0)
    assert out["advantages"].shape == mask.shape and 0 < clipped < 1 and (weights != 1).any()
    for row in range(mask.size(0)):  # each row's advantage times the token's weight
        on = mask[row].bool() & (weights[row] > 1e-3)
        ratio = out["advantages"][row][on] / weights[row][on]
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-4, atol=1e-6)


def test_importance_weights_correct_a_bandit_gradient():
    """A softmax policy over 6 actions, sampled with guidance and temperature (a distribution the policy is not):
    the importance-weighted estimate of the policy gradient matches the exact one within its standard error; the
    uncorrected estimate does not."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_(True)
    uncond = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    reward = torch.tensor([1.0, -0.5, 2.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    log_pi = torch.log_softmax(theta, -1)
    exact = torch.autograd.grad((log_pi.exp() * reward).sum(), theta)[0]
    # the rollout's sampling distribution: guidance 2.0, temperature 0.8, no top-k (top-k has no importance fix:
    # codes it removed are never drawn; sampler_correction 'guided' is exact there)
    scores, _ = code_scores(
        theta.detach()[None], uncond, torch.ones(6, dtype=torch.bool), guidance_scale=2.0, temperature=0.8, top_k=0
    )
    log_q = torch.log_softmax(scores[0].double(), -1)
    n = 200_000
    actions = torch.multinomial(log_q.exp(), n, replacement=True, generator=gen)
    weights, clipped = importance_weights(
        log_pi.detach()[actions][:, None], log_q[actions][:, None], torch.ones(n, 1), "token_truncate", None, 1e6
    )
    assert clipped == 0
    # per-sample gradient of w * r * log pi(a): the REINFORCE estimate, as GRPO's loss gives it
    grad_log_pi = torch.eye(6, dtype=torch.float64)[actions] - log_pi.exp().detach()
    corrected = weights * reward[actions][:, None] * grad_log_pi
    plain = reward[actions][:, None] * grad_log_pi
    se = corrected.std(0) / n**0.5
    assert ((corrected.mean(0) - exact).abs() < 4 * se + 1e-4).all()
    assert ((plain.mean(0) - exact).abs() > 10 * (plain.std(0) / n**0.5)).any()


def test_importance_modes_and_bounds():
    trained = torch.tensor([[0.0, -1.0, -2.0], [0.0, 0.0, 0.0]])
    sampling = torch.tensor([[-2.0, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w, frac = importance_weights(trained, sampling, mask, "token_truncate", 0.5, 3.0)
    torch.testing.assert_close(w, torch.tensor([[3.0, 1.0, 0.5], [1.6487, 1.0, 1.0]]), atol=1e-4, rtol=0)
    assert frac == pytest.approx(2 / 5)
    w, _ = importance_weights(trained, sampling, mask, "token_mask", 0.5, 3.0)
    assert w[0].tolist() == [0.0, 1.0, 0.0]
    w, frac = importance_weights(trained, sampling, mask, "sequence_truncate", None, 3.0)
    torch.testing.assert_close(w, torch.tensor([[1.0], [1.6487]]), atol=1e-4, rtol=0)  # exp(0) and exp(0.5)
    assert frac == 0
    with pytest.raises(ValueError, match="sequence_clip"):
        importance_weights(trained, sampling, mask, "sequence_clip")


@pytest.mark.parametrize(
    "field,value",
    [("repetition_penalty", 1.2), ("generation_kwargs", {"num_beams": 2}), ("cache_implementation", "static")],
)
def test_unhonoured_generation_options_are_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        _args(tmp_path, **{field: value})


def test_sampler_correction_choices_are_checked(tmp_path):
    with pytest.raises(ValueError, match="sampler_correction"):
        _args(tmp_path, sampler_correction="exact")
    with pytest.raises(ValueError, match="logprob_support"):
        _args(tmp_path, logprob_support="full")  # guided scores the sampler's own support
    assert _args(tmp_path, min_p=0.1).rollout_config().text_min_p == 0.1
    assert _args(tmp_path, top_k=1).rollout_config().text_top_k == 1  # the paper's greedy text


def test_a_chain_closed_in_text_is_not_masked_as_truncated(tiny_path, dataset, tmp_path):
    trainer = _trainer(tiny_path, dataset, tmp_path, mask_truncated_completions=True, max_completion_length=12)
    close = trainer.backend.tag_ids["</final_image>"]
    trainer.model.lm_head.register_forward_hook(
        lambda m, i, out: out.index_add(-1, torch.tensor([close]), torch.full((*out.shape[:-1], 1), 500.0))
    )
    rows = [dict(dataset[0], prompt=trainer.args.prompt_template) for _ in range(4)]
    out = trainer._generate_and_score_completions(rows)
    assert (out["completion_ids"][:, 0] == close).all()
    assert (out["completion_mask"].sum(-1) == 2).all()  # kept in the loss: </final_image> (sampled) and EOS
