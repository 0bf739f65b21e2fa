"""Per-token log-probs of a completion, in bounded memory: under the sampler's support and temperatures
(``completion_logps``), or under the very distribution each token was drawn from, guidance and top-k included
(``sampled_logps``); and the importance weights that correct the first for where it is not the second.

A paper-shape GRPO batch is 5 rows x ~5.5k completion positions x the whole vocabulary. One float32 copy of those
logits is ~8 GB at a 74k vocabulary (~20 GB at Emu3's 184k), and a plain log-softmax with a support mask keeps
several such copies alive for the backward pass. Here the positions go through in chunks of ``chunk_tokens``; with
gradients each chunk runs under activation checkpointing, so the backward pass keeps only the model's own logits and
recomputes one chunk at a time. Kept apart from the trainer so the benchmark measures this very code without TRL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from vlcot_grpo.sampling import step_scores


def completion_logps(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    code_mask: torch.Tensor,
    text_mask: torch.Tensor,
    text_temperature: float,
    image_temperature: float,
    restricted: bool = True,
    compute_entropy: bool = False,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``logits`` (B, T, V) predicting ``targets`` (B, T) -> log-probs (B, T) and, optionally, entropies (B, T).

    Image-code targets are scored at ``image_temperature`` and, when ``restricted``, over the image codes only
    (``code_mask``); every other target at ``text_temperature`` over ``text_mask``. A target outside its support (a
    forced layout token, which the loss masks out) is added to the support, so its value stays finite and <= 0."""
    code_mask = code_mask.to(logits.device)
    text_mask = text_mask.to(logits.device)
    settings = (code_mask, text_mask, float(text_temperature), float(image_temperature), restricted, compute_entropy)
    return _chunked(_chunk_logps, logits, targets, (), settings, compute_entropy, chunk_tokens, logits.requires_grad)


def _chunked(fn, logits, targets, per_position, shared, compute_entropy, chunk_tokens, with_grad):
    """``fn(logits piece, targets piece, *per_position pieces, *shared)`` over pieces of ``chunk_tokens`` positions,
    each under activation checkpointing when gradients flow; the pieces' (log-probs, entropies) joined to (B, T).
    Row by row, then along the row: every piece is a view of ``logits`` (flattening a sliced batch would copy it);
    a ``per_position`` entry is a (B, T) tensor cut the same way, or None."""
    with_grad = torch.is_grad_enabled() and with_grad
    step = max(1, chunk_tokens)
    logps, entropies = [], []
    for row in range(logits.shape[0]):
        for start in range(0, logits.shape[1], step):
            cut = slice(start, start + step)
            pieces = [logits[row, cut], targets[row, cut]] + [None if t is None else t[row, cut] for t in per_position]
            if with_grad:
                lp, ent = checkpoint(fn, *pieces, *shared, use_reentrant=False)
            else:
                lp, ent = fn(*pieces, *shared)
            logps.append(lp)
            entropies.append(ent)
    shape = targets.shape
    logps_out = torch.cat(logps).view(shape) if logps else logits.new_zeros(shape, dtype=torch.float32)
    if not compute_entropy:
        return logps_out, None
    return logps_out, (torch.cat(entropies).view(shape) if entropies else torch.zeros_like(logps_out))


def _chunk_logps(logits, targets, code_mask, text_mask, text_temperature, image_temperature, restricted, entropy):
    """One chunk: ``logits`` (N, V), ``targets`` (N,) -> (log-probs (N,), entropies (N,) or None)."""
    is_code = code_mask[targets]
    temperature = torch.where(is_code, image_temperature, text_temperature).to(torch.float32)
    scores = logits.float() / temperature[:, None]
    if restricted:
        allowed = torch.where(is_code[:, None], code_mask, text_mask)
        allowed.scatter_(1, targets[:, None], True)
        scores = scores.masked_fill(~allowed, float("-inf"))
    log_probs = torch.log_softmax(scores, dim=-1)
    logps = log_probs.gather(1, targets[:, None]).squeeze(1)
    if not entropy:
        return logps, None
    return logps, -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1)


def sampled_logps(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    code_mask: torch.Tensor,
    text_mask: torch.Tensor,
    settings: dict,
    top_k: torch.Tensor,
    uncond_logits: torch.Tensor | None = None,
    uncond_index: torch.Tensor | None = None,
    compute_entropy: bool = False,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``logits`` (B, T, V) predicting ``targets`` (B, T) -> log-probs (B, T) under the distribution the rollout
    drew each token from (``vlcot_grpo.sampling``, ``settings`` = ``fast_rollout.sampler_settings``) and,
    optionally, its entropies.

    Image-code targets: guided by ``uncond_logits`` (S, L, V), the unconditional branch's logits over each image
    (``uncond_index`` (B, T): the flat index ``s * L + l`` of the row that predicts the target, -1 = none), then
    top-k with the sampled ``top_k`` (B, T) (0 = none) and the image temperature. Other targets: the text filters and
    temperature. The target always stays in its support, so a forced layout token (which the loss masks out) or a
    code that float rounding moved past the k-th best keeps a finite value."""
    code_mask, text_mask = code_mask.to(logits.device), text_mask.to(logits.device)
    flat_uncond = None if uncond_logits is None else uncond_logits.reshape(-1, uncond_logits.shape[-1])
    with_grad = logits.requires_grad or (flat_uncond is not None and flat_uncond.requires_grad)
    shared = (flat_uncond, code_mask, text_mask, settings, compute_entropy)
    return _chunked(
        _chunk_sampled, logits, targets, (top_k, uncond_index), shared, compute_entropy, chunk_tokens, with_grad
    )


@dataclass
class GuidanceRows:
    """The unconditional branch's rows for a training batch: one per image, its tokens from the image-start token
    on (right-padded), positions from 0, as the rollout ran them; ``index`` (B, T): the flat row ``s * L + l`` of
    those rows' logits (S, L, V) that guided each completion target, -1 for targets outside images."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor


def guidance_rows(engine, ids: torch.Tensor, mask: torch.Tensor, width: int) -> GuidanceRows:
    """``ids`` / ``mask`` (B, P + width): left-padded prompts then right-padded completions of ``width`` tokens, as
    TRL batches them; ``engine``: the ``RolloutEngine`` that wrote them (its state machine places the images). A
    batch without any image gets one stand-in row, so that a forward pass over it always runs."""
    completions, lengths = ids[:, -width:].tolist(), mask[:, -width:].sum(-1).tolist()
    last_prompt = ids[:, -width - 1].tolist()
    segments, targets = [], []  # each row's tokens; (batch row, first target column, targets) per row
    for row, (tokens, length) in enumerate(zip(completions, lengths)):
        tokens = tokens[:length]
        positions = engine.image_positions(tokens, last_prompt[row])
        for start in (i for i, p in enumerate(positions) if p == 0):
            end = start + 1
            while end < len(positions) and positions[end] == end - start:
                end += 1
            if end - start > 1:  # every token but the image's last one predicts the next
                segments.append(tokens[start : end - 1])
                targets.append((row, start + 1, end - start - 1))
    segments = segments or [[engine.pad_id]]
    span = max(len(t) for t in segments)
    input_ids = torch.full((len(segments), span), engine.pad_id, dtype=torch.long)
    attention = torch.zeros((len(segments), span), dtype=torch.long)
    for i, tokens in enumerate(segments):
        input_ids[i, : len(tokens)] = torch.tensor(tokens)
        attention[i, : len(tokens)] = 1
    index = torch.full((len(completions), width), -1, dtype=torch.long)
    for i, (row, first, count) in enumerate(targets):
        index[row, first : first + count] = torch.arange(i * span, i * span + count)
    device = ids.device
    positions = torch.arange(span, device=device).expand(len(segments), span)
    return GuidanceRows(input_ids.to(device), attention.to(device), positions, index.to(device))


def _chunk_sampled(logits, targets, top_k, index, flat_uncond, code_mask, text_mask, settings, entropy):
    """One chunk of ``sampled_logps``: ``logits`` (N, V), ``targets`` / ``top_k`` / ``index`` (N,)."""
    is_code = code_mask[targets]
    uncond = None
    if flat_uncond is not None and settings["guidance_scale"] != 1.0:
        # rows without an unconditional row (text) use their own logits: u = c leaves them unguided
        gathered = flat_uncond[index.clamp(min=0)]
        uncond = torch.where((index >= 0)[:, None], gathered, logits.to(gathered.dtype))
    text, codes, _ = step_scores(logits, uncond, text_mask, code_mask, settings, k=top_k, keep=targets)
    log_probs = torch.log_softmax(torch.where(is_code[:, None], codes, text), dim=-1)
    logps = log_probs.gather(1, targets[:, None]).squeeze(1)
    if not entropy:
        return logps, None
    return logps, -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1)


#: TRL's importance-sampling modes (GRPOConfig.vllm_importance_sampling_mode)
IMPORTANCE_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_weights(
    trained_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_truncate",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights exp(trained - sampling) of the sampled tokens, as TRL computes them for vLLM
    rollouts: per token (B, T) or per sequence (B, 1, the product over the row's ``mask``ed tokens); ``*_truncate``
    clips them to [clip_min, clip_max], ``*_mask`` sets those outside to 0. Returns (weights, fraction clipped or
    masked among the tokens or sequences). Masked-out tokens weigh 1 (the loss ignores them)."""
    if mode not in IMPORTANCE_MODES:
        raise ValueError(f"importance sampling mode must be one of {IMPORTANCE_MODES}, got {mode!r}")
    mask = mask.bool()
    diff = ((trained_logps - sampling_logps) * mask).nan_to_num(nan=0.0)
    sequence = mode.startswith("sequence")
    log_w = diff.sum(-1, keepdim=True) if sequence else diff
    low = -math.inf if clip_min is None else math.log(clip_min) if clip_min > 0 else -math.inf
    high = math.inf if clip_max is None else math.log(clip_max)
    outside = (log_w < low) | (log_w > high)
    counted = torch.ones_like(outside) if sequence else mask
    fraction = (outside & counted).sum() / counted.sum().clamp(min=1)
    if mode.endswith("truncate"):
        weights = log_w.clamp(low, high).exp()
    else:
        weights = log_w.exp().masked_fill(outside, 0.0)
    if not sequence:
        weights = weights.masked_fill(~mask, 1.0)
    return weights, fraction
