"""The sampler (vlcot_grpo.sampling) against the paper's rule and transformers' warpers, written out independently,
and the engines' sampling log-probs and top-k against a hand computation on a real model step."""

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlcot_grpo.rollout import RolloutConfig, RolloutEngine
from vlcot_grpo.sampling import code_scores, entropy_top_k, keep_top_k, text_scores
from vlcot_grpo.vlcot import encode_prompt

SIZES = {"rough": (8, 8), "middle": (16, 16), "final": (32, 32)}


def paper_k(entropy: float) -> int:
    """PURE's ``_calculate_dynamic_top_k`` as its source states it, in Python floats: clip H to [0, 10],
    k = 1 + 1999 sigmoid(H - 5), round to the nearest integer, bound to [1, 2000]."""
    h = max(0.0, min(entropy, 10.0))
    return max(1, min(2000, int(round(1 + 1999 / (1 + math.exp(-(h - 5)))))))


def entropy64(logits: np.ndarray) -> float:
    """Entropy (nats) of softmax(logits) in float64; -inf entries have zero probability."""
    finite = logits[np.isfinite(logits)].astype(np.float64)
    p = np.exp(finite - finite.max())
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def test_entropy_top_k_on_distributions_of_known_entropy():
    # uniform over n entries of a 70k vocabulary: H = ln n exactly, from 0 to 11.1 nats (clipped at 10)
    sizes = [1, 2, 5, 7, 23, 150, 800, 5000, 20000, 65536]
    scores = torch.full((len(sizes), 70_000), float("-inf"))
    for row, n in enumerate(sizes):
        scores[row, :n] = 0.0
    got = entropy_top_k(scores).tolist()
    assert got == [paper_k(math.log(n)) for n in sizes]
    assert got[0] == 14 and got[-1] == 1987  # the rule's ends: sigmoid(-5) and sigmoid(5)


def test_entropy_top_k_on_peaked_distributions():
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.0, 0.3, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0])[:, None]
    scores = torch.randn(8, 16384, generator=gen) * scale
    expected = [paper_k(entropy64(row.numpy())) for row in scores]
    assert entropy_top_k(scores).tolist() == expected
    assert len(set(expected)) == 8  # the rows span the rule's range, not one k


def test_guidance_then_entropy_before_temperature():
    """k is taken from the guided code distribution before temperature, and the kept set is its k best codes."""
    gen = torch.Generator().manual_seed(1)
    vocab, scale = 600, 0.8
    cond, uncond = torch.randn(3, vocab, generator=gen) * 4, torch.randn(3, vocab, generator=gen) * 4
    code_mask = torch.zeros(vocab, dtype=torch.bool)
    code_mask[100:500] = True
    for temperature in (0.5, 0.9, 1.0):
        scores, k = code_scores(cond, uncond, code_mask, guidance_scale=scale, temperature=temperature, top_k=-1)
        for row in range(3):
            c = torch.log_softmax(cond[row].double(), -1).numpy()
            u = torch.log_softmax(uncond[row].double(), -1).numpy()
            g = np.where(code_mask.numpy(), u + scale * (c - u), -np.inf)
            want = paper_k(entropy64(g))
            assert k[row] == want
            assert want < code_mask.sum()  # top-k cuts: the kept set below is not just the support
            kept = set(np.argsort(-g, kind="stable")[:want].tolist())
            assert set(torch.isfinite(scores[row]).nonzero().squeeze(-1).tolist()) == kept
            # what is drawn: softmax(g / T) over the kept set
            probs = np.exp(np.where(np.isin(np.arange(vocab), list(kept)), g / temperature, -np.inf) - g.max())
            probs /= probs.sum()
            assert torch.softmax(scores[row], -1).double().numpy() == pytest.approx(probs, abs=1e-6)
    # measured after the temperature (the old order), k would differ: this test can tell
    hot = entropy_top_k(torch.log_softmax(cond, -1).masked_fill(~code_mask, float("-inf")) / 0.5)
    cold = entropy_top_k(torch.log_softmax(cond, -1).masked_fill(~code_mask, float("-inf")))
    assert not torch.equal(hot, cold)


def test_keep_top_k_keeps_ties_and_zero_means_all():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 2.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    kept = keep_top_k(scores, torch.tensor([1, 3, 1, 0]), 4)
    assert torch.isfinite(kept).sum(-1).tolist() == [1, 3, 2, 4]
    assert torch.isfinite(kept[1]).tolist() == [False, True, True, True]


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (40, 1.0, 0.0), (0, 0.7, 0.0), (50, 0.9, 0.05)])
def test_text_scores_equal_transformers_warpers(top_k, top_p, min_p):
    """Text: transformers' own warpers in generate's order (temperature, top-k, top-p, min-p) give the same
    distribution over the text vocabulary."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 300, generator=gen) * 2
    text_mask = torch.ones(300, dtype=torch.bool)
    text_mask[250:] = False
    ours = text_scores(logits, text_mask, temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
    theirs = logits.masked_fill(~text_mask, float("-inf"))
    warpers = [TemperatureLogitsWarper(0.8)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p else []
    for warper in warpers:
        theirs = warper(None, theirs)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(theirs, -1))


@pytest.mark.parametrize("guidance", [1.0, 0.8, 3.0])
def test_engine_logprobs_and_top_k_on_a_real_model_step(tiny, photo, guidance):
    """The rollout's recorded top-k and sampling log-probs at image-code positions equal a hand computation from
    the model's own forward passes: the conditional row over prompt + completion, the unconditional row over the
    image alone from its image-start token (float64 from there on)."""
    model, _, backend = tiny
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out * 25.0)  # varied entropies below 256 codes
    try:
        prompt = encode_prompt(backend, photo, (16, 16)) + [backend.tag_ids["<rough_image>"]]
        config = RolloutConfig(
            stage_sizes=SIZES, max_new_tokens=10, image_top_k=-1, image_temperature=0.9, guidance_scale=guidance
        )
        batch = RolloutEngine(model, backend, config).generate([prompt], 4, torch.Generator().manual_seed(0))
        code_mask = backend.image_code_mask.numpy()
        seen_k = set()
        for ids, logps, ks in zip(batch.completion_ids, batch.logprobs, batch.top_k):
            for pos in (5, 6, 8, 9):  # the codes of the rough 2x2 image (5 header tokens, a row end at 7)
                with torch.no_grad():
                    c = model(input_ids=torch.tensor([prompt + ids[:pos]])).logits[0, -1].double()
                    u = model(input_ids=torch.tensor([ids[:pos]])).logits[0, -1].double()
                c, u = torch.log_softmax(c, -1).numpy(), torch.log_softmax(u, -1).numpy()
                g = u + guidance * (c - u) if guidance != 1.0 else c
                g = np.where(code_mask, g, -np.inf)
                k = paper_k(entropy64(g))
                assert ks[pos] == k
                kept = np.argsort(-g, kind="stable")[:k]
                assert ids[pos] in kept.tolist()
                z = g[kept] / 0.9
                want = z[kept.tolist().index(ids[pos])] - (z.max() + np.log(np.exp(z - z.max()).sum()))
                assert logps[pos] == pytest.approx(want, abs=1e-4)
                seen_k.add(k)
            assert ks[:5] == [0] * 5 and logps[:5] == [0.0] * 5 and ks[7] == 0  # forced layout tokens
        assert len(seen_k) > 3 and min(seen_k) < 256  # top-k really cut the 256 codes, at several sizes
    finally:
        handle.remove()


def test_greedy_rollouts_have_zero_logprobs(tiny, photo):
    model, _, backend = tiny
    prompt = encode_prompt(backend, photo, (16, 16))
    config = RolloutConfig(stage_sizes=SIZES, max_new_tokens=30, do_sample=False, image_top_k=-1)
    batch = RolloutEngine(model, backend, config).generate([prompt], 2)
    assert all(lp == [0.0] * len(ids) for lp, ids in zip(batch.logprobs, batch.completion_ids))


def test_sampler_settings_are_checked():
    with pytest.raises(ValueError, match="image_top_k"):
        RolloutConfig(image_top_k=-2)
    with pytest.raises(ValueError, match="text_top_p"):
        RolloutConfig(text_top_p=0.0)
    with pytest.raises(ValueError, match="temperatures must be positive"):
        RolloutConfig(image_temperature=0.0)
