"""Per-token log-probs of a completion under the sampler's support and temperatures, in bounded memory.

A paper-shape GRPO batch is 5 rows x ~5.5k completion positions x the whole vocabulary. One float32 copy of those
logits is ~8 GB at a 74k vocabulary (~20 GB at Emu3's 184k), and a plain log-softmax with a support mask keeps
several such copies alive for the backward pass. Here the positions go through in chunks of ``chunk_tokens``; with
gradients each chunk runs under activation checkpointing, so the backward pass keeps only the model's own logits and
recomputes one chunk at a time. Kept apart from the trainer so the benchmark measures this very code without TRL.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


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
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    step = max(1, chunk_tokens)
    logps, entropies = [], []
    # row by row, then along the row: every piece is a view of ``logits`` (flattening a sliced batch would copy it)
    for row in range(logits.shape[0]):
        for start in range(0, logits.shape[1], step):
            piece = (logits[row, start : start + step], targets[row, start : start + step])
            if with_grad:
                lp, ent = checkpoint(_chunk_logps, *piece, *settings, use_reentrant=False)
            else:
                lp, ent = _chunk_logps(*piece, *settings)
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
