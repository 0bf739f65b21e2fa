"""What a rollout draws each token from: one definition for both rollout engines (which draw from it) and for the
trained log-probs of ``sampler_correction: guided`` (which score what was drawn under it).

Image codes, in the order of the paper's released sampler (PURE ``inference_solver.py``, called by RealSR-R1's RL
loop through transformers' ``generate``, whose logits processors run before its temperature warper):

1. guidance: ``u + s (c - u)`` on log-softmaxed logits, ``s`` = ``guidance_scale`` (1.0 = off), ``u`` the logits of
   the unconditional branch, which sees only the current image from its image-start token on. PURE applies it to
   raw logits; the two differ by a constant per row, so they give the same distribution.
2. support: the image codes only.
3. entropy ``H`` (nats) of that distribution, before temperature, clipped to [0, 10].
4. top-k: a fixed ``k``, or the paper's ``k = round(1 + 1999 sigmoid(H - 5))`` (14 to 1987; PURE rounds to the
   nearest integer, as ``torch.round`` does). Codes tied with the k-th best are kept.
5. temperature.

Text: support (the text vocabulary), top-k, temperature, top-p, min-p: transformers' order (top-k does not depend
on the temperature, top-p and min-p do).

Every function takes scores of shape (rows, vocab) and works row-wise with fixed shapes and no host reads, so the
static engine can compile it and capture it in a CUDA graph.
"""

from __future__ import annotations

import torch

#: the paper's entropy-dependent top-k: k = K_MIN + (K_MAX - K_MIN) sigmoid(clip(H, 0, 10) - 5), rounded
ENTROPY_TOP_K_MIN, ENTROPY_TOP_K_MAX = 1, 2000
ENTROPY_CLIP = (0.0, 10.0)


def entropy_top_k(scores: torch.Tensor) -> torch.Tensor:
    """The paper's k per row, from ``scores`` restricted to their support (-inf elsewhere) and before temperature."""
    log_probs = torch.log_softmax(scores.float(), -1)
    entropy = -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1)
    entropy = entropy.clamp(*ENTROPY_CLIP)  # clipped after the sum (the old bug clipped the sum before negating)
    k = ENTROPY_TOP_K_MIN + (ENTROPY_TOP_K_MAX - ENTROPY_TOP_K_MIN) * torch.sigmoid(entropy - 5)
    return torch.round(k).long().clamp(ENTROPY_TOP_K_MIN, ENTROPY_TOP_K_MAX)


def guided(logits: torch.Tensor, uncond_logits: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """Guided scores ``u + s (c - u)`` on log-softmaxed logits; the conditional log-softmax where guidance is off."""
    cond = torch.log_softmax(logits.float(), -1)
    if uncond_logits is None or guidance_scale == 1.0:
        return cond
    uncond = torch.log_softmax(uncond_logits.float(), -1)
    return uncond + guidance_scale * (cond - uncond)


def top_k_bound(top_k: int) -> int:
    """The largest k a ``top_k`` setting can give (-1: the entropy rule's bound; 0: no top-k)."""
    return ENTROPY_TOP_K_MAX if top_k == -1 else max(top_k, 0)


def code_scores(
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    code_mask: torch.Tensor,
    *,
    guidance_scale: float,
    temperature: float,
    top_k: int,
    k: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores image codes are drawn from (softmax them), and the top-k of each row (0: none).

    ``top_k``: 0 = off, > 0 fixed, -1 = the entropy rule. ``k`` (rows,), when given, replaces the rule's k: the
    trained log-probs keep the support that was sampled (0 in a row: no top-k there). ``keep`` (rows,): a token
    per row that stays in the support whatever the filters say (the trained log-probs' target)."""
    scores = guided(logits, uncond_logits, guidance_scale)
    scores, protect = _support(scores, code_mask, keep)
    if k is None:
        if top_k == -1:
            k = entropy_top_k(scores)
        else:
            k = torch.full(scores.shape[:1], max(top_k, 0), dtype=torch.long, device=scores.device)
    bound = top_k_bound(top_k)
    if bound:
        scores = keep_top_k(scores, k, bound, protect)
    return scores / max(temperature, 1e-6), k


def text_scores(
    logits: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scores text tokens are drawn from (softmax them). ``keep``: as in ``code_scores``."""
    scores, protect = _support(logits.float(), text_mask, keep)
    if top_k > 0:
        scores = keep_top_k(scores, torch.full(scores.shape[:1], top_k, device=scores.device), top_k, protect)
    scores = scores / max(temperature, 1e-6)
    if top_p < 1.0:
        scores = keep_top_p(scores, top_p, protect)
    if min_p > 0.0:
        scores = keep_min_p(scores, min_p, protect)
    return scores


def _support(scores, mask, keep):
    """``scores`` outside ``mask`` set to -inf, except each row's ``keep`` token; and the (rows, vocab) mask of those
    kept tokens (None without ``keep``), which no filter drops."""
    if keep is None:
        return scores.masked_fill(~mask, float("-inf")), None
    protect = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, keep[:, None], True)
    return scores.masked_fill(~mask & ~protect, float("-inf")), protect


def _dropped(drop, protect):
    return drop if protect is None else drop & ~protect


def keep_top_k(scores: torch.Tensor, k: torch.Tensor, bound: int, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``k[i]`` best scores of row ``i`` (ties with the k-th kept; ``k[i]`` 0: the whole row), with
    ``topk`` of the largest possible k instead of a sort. ``protect``: entries never dropped."""
    bound = min(bound, scores.shape[-1])
    best = scores.topk(bound, dim=-1).values
    kth = best.gather(-1, (k.clamp(1, bound) - 1)[:, None])
    return scores.masked_fill(_dropped((scores < kth) & (k > 0)[:, None], protect), float("-inf"))


def keep_top_p(scores: torch.Tensor, top_p: float, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probabilities add up to ``top_p`` (the best one always)."""
    sorted_scores, order = scores.sort(-1, descending=True)
    probs = torch.softmax(sorted_scores, -1)
    drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, probs.cumsum(-1) - probs > top_p)
    return scores.masked_fill(_dropped(drop, protect), float("-inf"))


def keep_min_p(scores: torch.Tensor, min_p: float, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the tokens at least ``min_p`` times as probable as the best one."""
    log_probs = torch.log_softmax(scores, -1)
    threshold = log_probs.max(-1, keepdim=True).values + torch.log(torch.tensor(min_p, device=scores.device))
    return scores.masked_fill(_dropped(log_probs < threshold, protect), float("-inf"))


#: the RolloutConfig fields the sampler reads
SETTINGS = (
    "guidance_scale",
    "text_temperature",
    "text_top_k",
    "text_top_p",
    "text_min_p",
    "image_temperature",
    "image_top_k",
)


def sampler_settings(config) -> dict:
    """The sampler's fields of a ``RolloutConfig``, as plain numbers (constants to ``torch.compile``)."""
    return {name: getattr(config, name) for name in SETTINGS}


def step_scores(
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    text_mask: torch.Tensor,
    code_mask: torch.Tensor,
    settings: dict,
    k: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a step draws its text token and its image code from, per row: (text scores, code scores, the codes'
    top-k), ``settings`` from ``sampler_settings``. Both engines draw from these; the trained log-probs score them
    (``k``, ``keep``: see ``code_scores``)."""
    text = text_scores(
        logits,
        text_mask,
        temperature=settings["text_temperature"],
        top_k=settings["text_top_k"],
        top_p=settings["text_top_p"],
        min_p=settings["text_min_p"],
        keep=keep,
    )
    codes, k = code_scores(
        logits,
        uncond_logits,
        code_mask,
        guidance_scale=settings["guidance_scale"],
        temperature=settings["image_temperature"],
        top_k=settings["image_top_k"],
        k=k,
        keep=keep,
    )
    return text, codes, k


def exponential_race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``probs`` (unnormalised is fine) with ``noise`` ~ Exp(1) of the same shape:
    ``argmax(p / E)``, what ``torch.multinomial`` computes for one sample, without its host-side checks."""
    # an exact 0 from exponential_ would turn a zero probability into NaN, which argmax prefers
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(-1)


def log_prob_of(scores: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """log softmax(scores)[token] per row: the sampling log-prob of a drawn token."""
    return torch.log_softmax(scores, -1).gather(-1, token[:, None]).squeeze(-1)
