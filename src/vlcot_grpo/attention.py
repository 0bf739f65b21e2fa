"""Attention of one decode step over the static engine's caches (``vlcot_grpo.kv_cache``), and the kernels it uses.

``split_attention`` is registered with transformers as ``vlcot_split``: while the static engine decodes, every
attention layer calls it, the conditional rows (the first half of the batch) read their row cache, and the guidance
rows (the second half) their guidance cache. Grouped-query heads are folded into the query length, so keys and values
are never repeated. The masks are additive (0 / -inf in the model's dtype), made once per step for every layer
(``additive_mask``): a boolean mask would be converted inside every call.

Kernels (``decode_attention``): "sdpa" (torch's fused attention), "split" (that kernel on pieces of the cache merged
by their log-sum-exps, as flash-decoding does: more thread blocks for few rows). ``share_prompt_cache`` reads a
prompt once for its rows (``attend_shared``) and merges that with each row's own tokens (``merge_shared_attention``).
Which is faster is a GPU measurement: docs/benchmarks.md.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

__all__ = [
    "ATTENTION_NAME",
    "OPAQUE_ATTENTION_NAME",
    "SPLIT_ALIGN",
    "SPLIT_BLOCKS_PER_UNIT",
    "SPLIT_MIN_PIECE",
    "additive_mask",
    "attend",
    "attend_shared",
    "attention_implementation",
    "attention_with_lse",
    "compiled_merge",
    "compute_units",
    "merge_shared_attention",
    "num_splits",
    "prompt_pieces",
    "round_up",
    "split_attention",
    "split_bias",
    "split_kv_attention",
    "window_bias",
]

ATTENTION_NAME = "vlcot_split"


def attend(query, keys, values, bias, scaling, kernel="sdpa"):
    """Attention of ``query`` (B, H, W, D) to ``keys``/``values`` (B, Hkv, L, D) under the additive mask ``bias``
    (B, 1, 1, L), or (B, 1, W, L) for a window of W tokens per row (kernel "sdpa" only).

    ``kernel``: "sdpa" (torch's fused attention; with a mask on recent NVIDIA GPUs that is cuDNN's kernel, one block per
    (row, head): few blocks for a decode step), "split" (the same kernel on pieces of the cache, merged by their
    log-sum-exps, as flash-decoding does; ``bias`` is then ``split_bias``'s (B * Hkv, pieces, 1, L / pieces)). Which
    one streams the cache faster is a GPU measurement (``benchmarks/rollout.py --compare-attention``)."""
    b, heads, w, dim = query.shape
    kv_heads = keys.shape[1]
    # Query heads that share a key/value head become that head's "query positions": no repeat of the cache.
    q = query.reshape(b, kv_heads, heads // kv_heads * w, dim)
    if kernel == "split":
        return split_kv_attention(q, keys, values, bias, scaling).reshape(b, heads, 1, dim)
    bias = window_bias(bias, heads // kv_heads)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scaling).reshape(b, heads, w, dim)


def window_bias(bias: torch.Tensor, rep: int) -> torch.Tensor:
    """A window's mask (B, 1, W, L) for queries folded as (query heads per key/value head x W): each query
    position's row repeated for its ``rep`` heads. A one-token mask (B, 1, 1, L) broadcasts as it is."""
    b, _, w, length = bias.shape
    if w == 1 or rep == 1:
        return bias
    return bias[:, :, None].expand(b, 1, rep, w, length).reshape(b, 1, rep * w, length)


# "split" (flash-decoding): one decode step has B x kv_heads (row, head) pairs, and SDPA gives each pair one thread
# block that walks the whole cache: at the paper shape about one block per SM. Cutting each pair's keys into pieces
# gives every SM several blocks; the pieces' partial attentions are merged with their log-sum-exps, which only torch's
# private SDPA ops return. Measured slightly slower than plain SDPA (the merge's extra kernels cost what the pieces
# gained; docs/benchmarks.md), so it is an option, not the default.
SPLIT_MIN_PIECE = 128  # positions per piece, at least
SPLIT_BLOCKS_PER_UNIT = 8  # aim: this many (row, head, piece) blocks per SM (per CPU thread)
SPLIT_ALIGN = 16  # pieces are multiples of this: the memory-efficient kernel wants aligned mask rows


def compute_units(device: torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return torch.get_num_threads()


def num_splits(pairs: int, length: int, units: int) -> int:
    """Pieces for ``pairs`` (row, head) pairs reading ``length`` positions: a power of two, each piece a multiple of
    ``SPLIT_ALIGN`` and no shorter than ``SPLIT_MIN_PIECE``, just enough for ``SPLIT_BLOCKS_PER_UNIT`` blocks per
    unit."""
    splits = 1
    while (
        pairs * splits < SPLIT_BLOCKS_PER_UNIT * units
        and length % (2 * splits * SPLIT_ALIGN) == 0
        and length // (2 * splits) >= SPLIT_MIN_PIECE
    ):
        splits *= 2
    return splits


def split_bias(allowed: torch.Tensor, kv_heads: int, splits: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool -> the "split" kernel's additive mask (B * kv_heads, splits, 1, L / splits). Made once per step.
    Masked positions get a large finite negative number instead of -inf, so that a piece with no visible position
    (past the written column, or all left padding) yields a finite partial result whose weight is exactly 0."""
    b, length = allowed.shape
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    bias = torch.where(allowed, zero, max(torch.finfo(dtype).min, -1e30))
    bias = bias.view(b, 1, splits, 1, length // splits).expand(b, kv_heads, splits, 1, length // splits)
    return bias.reshape(b * kv_heads, splits, 1, length // splits)


def attention_with_lse(q, k, v, bias, scale):
    """SDPA returning also each query row's log-sum-exp (B, H, M) in float32, through the private aten op that
    ``F.scaled_dot_product_attention`` itself would dispatch to for these inputs. Under autocast (the trainer's bf16
    on a CPU with fp32 weights) the cached keys and values can differ in dtype; autocast would cast them for these
    ops but not the mask, so here all four meet in the widest dtype instead, with autocast off."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if not q.dtype == k.dtype == v.dtype == bias.dtype == dtype:
        q, k, v, bias = (t.to(dtype) for t in (q, k, v, bias))
    off = (
        torch.autocast(q.device.type, enabled=False)
        if torch.amp.is_autocast_available(q.device.type)
        else nullcontext()
    )
    with off:
        if q.device.type == "cuda":
            if q.dtype in (torch.float16, torch.bfloat16):  # cuDNN: what SDPA picks for masked bf16 on Hopper
                out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, scale=scale)[:2]
                return out, lse.reshape(q.shape[:3])
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)[:2]
            return out, lse[..., : q.shape[2]]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)


def split_kv_attention(q, keys, values, bias, scaling):
    """``q`` (B, Hkv, rep, D) against ``keys``/``values`` (B, Hkv, L, D) cut into ``bias.shape[1]`` pieces
    (``split_bias``). Returns (B * Hkv, rep, D)."""
    b, kv_heads, rep, dim = q.shape
    pairs, splits, _, piece = bias.shape
    # (B, Hkv) merge into one batch dim and the positions into (splits, piece): views of the cache, no copy
    k = keys.flatten(0, 1).unflatten(1, (splits, piece))
    v = values.flatten(0, 1).unflatten(1, (splits, piece))
    qs = q.unsqueeze(2).expand(b, kv_heads, splits, rep, dim).reshape(pairs, splits, rep, dim)  # one small copy
    parts, lse = attention_with_lse(qs, k, v, bias.expand(pairs, splits, rep, piece), scaling)
    weight = torch.softmax(lse, dim=1).to(parts.dtype)  # (pairs, splits, rep): each piece's share of the total
    return (parts * weight[..., None]).sum(1)


def prompt_pieces(pairs: int, width: int, units: int) -> tuple[int, int]:
    """share_prompt_cache: (pieces, positions per piece) to cut a ``width``-long prompt into for ``pairs``
    (prompt, key/value head) pairs. One thread block per pair would leave most SMs idle (32 blocks for 132 SMs at
    the 7B paper shape), so the prompt is cut, as "split" cuts the cache: pieces of a multiple of ``SPLIT_ALIGN``, at
    least about ``SPLIT_MIN_PIECE`` long, just enough for ``SPLIT_BLOCKS_PER_UNIT`` blocks per unit. The prompt
    buffer is pieces x piece long, less than ``SPLIT_ALIGN`` positions per piece past the prompt (at 7B: 33 pieces of
    128 for 4191 positions)."""
    target = max(SPLIT_MIN_PIECE, math.ceil(width * pairs / (SPLIT_BLOCKS_PER_UNIT * units)))
    piece = round_up(math.ceil(width / math.ceil(width / target)), SPLIT_ALIGN, 1 << 62)
    return math.ceil(width / piece), piece  # counted again: rounding the piece up may leave a last one empty


def merge_shared_attention(prompt_out, prompt_lse, own_out, own_lse):
    """``share_prompt_cache``: each row's attention over its prompt's pieces and over its own generated keys, merged
    by their log-sum-exps (float32): each part weighted by its share of the softmax mass. ``prompt_out``
    (P x Hkv, pieces, G x rep, D) and ``prompt_lse`` (P x Hkv, pieces, G x rep) have a prompt's G rows as query
    positions; ``own_out`` (R, Hkv, rep, D) and ``own_lse`` (R, Hkv, rep) one row each, R = P x G. Returns (R, Hkv,
    rep, D). Compiled under compile_step: regrouping and merge in one kernel or two."""
    rows, kv_heads, rep, dim = own_out.shape
    pairs, pieces = prompt_out.shape[:2]
    prompts = pairs // kv_heads
    generations = rows // prompts
    # (P, Hkv, pieces, G, rep, ...) -> (P, G, Hkv, rep, pieces, ...) -> (R, Hkv, rep, pieces, ...)
    lse = prompt_lse.reshape(prompts, kv_heads, pieces, generations, rep).permute(0, 3, 1, 4, 2).flatten(0, 1)
    out = prompt_out.reshape(prompts, kv_heads, pieces, generations, rep, dim).permute(0, 3, 1, 4, 2, 5)
    share = torch.softmax(torch.cat([lse, own_lse[..., None]], -1), -1)  # (R, Hkv, rep, pieces + 1)
    merged = (out.flatten(0, 1).float() * share[..., :-1, None]).sum(-2) + own_out.float() * share[..., -1:]
    return merged.to(own_out.dtype)


compiled_merge = torch.compile(merge_shared_attention, dynamic=True)


def attend_shared(query, prompt_keys, prompt_values, prompt_bias, keys, values, bias, generations, scaling, merge):
    """``share_prompt_cache``: ``query`` (R, H, W, D) (W = 1 but in window steps), rows in prompt order (R = P x ``generations``), against its
    prompt's keys (P, Hkv, W', D), read once for all the prompt's rows in the pieces of ``prompt_bias`` (the "split"
    mask, ``split_bias``: (P x Hkv, pieces, 1, W' / pieces)), and its own generated keys (R, Hkv, n, D) under
    ``bias`` (R, 1, 1, n). The parts are merged by ``merge`` (``merge_shared_attention``)."""
    r, heads, w, dim = query.shape
    prompts, kv_heads = prompt_keys.shape[:2]
    pairs, pieces, _, piece = prompt_bias.shape
    rep, n = heads // kv_heads * w, keys.shape[2]  # a window's W queries are query positions too
    q = query.reshape(r, kv_heads, rep, dim)
    bias = window_bias(bias, heads // kv_heads)
    # A prompt's rows become ``generations x rep`` query positions of one attention over each piece of that prompt,
    # as grouped query heads do: one pass over the prompt instead of one per row.
    grouped = q.view(prompts, generations, kv_heads, rep, dim).transpose(1, 2).reshape(pairs, 1, -1, dim)
    queries = grouped.expand(pairs, pieces, generations * rep, dim).contiguous()  # small: a copy per piece
    k = prompt_keys.view(pairs, pieces, piece, dim)
    v = prompt_values.view(pairs, pieces, piece, dim)
    mask = prompt_bias.expand(pairs, pieces, generations * rep, piece)
    prompt_out, prompt_lse = attention_with_lse(queries, k, v, mask, scaling)
    own_out, own_lse = attention_with_lse(q, keys, values, bias.expand(r, kv_heads, rep, n), scaling)
    # detached: the same data, no longer views; a compiled merge would otherwise guard on the sizes of their bases
    parts = (t.detach() for t in (prompt_out, prompt_lse, own_out, own_lse))
    return merge(*parts).reshape(r, heads, w, dim)


def split_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered as ``vlcot_split``: the step's queries against the static caches passed as
    ``vlcot_kv`` (``kv_cache.DecodeCaches.attend``). Returns (batch, 1, heads, head_dim) like transformers' SDPA."""
    out = kwargs["vlcot_kv"].attend(query, module.layer_idx, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, split_attention)

# compile_step compiles each decoder layer, and all layers must share one compiled code. The cache writes and the
# split attention index per-layer buffers by ``layer_idx``: traced, they would give every layer its own code (and
# hit dynamo's recompile limit), so under compile_step they run outside the compiled regions.
OPAQUE_ATTENTION_NAME = "vlcot_split_opaque"
AttentionInterface.register(OPAQUE_ATTENTION_NAME, torch.compiler.disable(split_attention))


@contextmanager
def attention_implementation(model, name: str):
    """Temporarily switch the attention function of every config that an attention layer of ``model`` reads."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(module, "layer_idx") and config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
    saved = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = saved[key]


def round_up(length: int, multiple: int, cap: int = 1 << 62) -> int:
    """``length`` rounded up to a multiple of ``multiple``, at most ``cap``."""
    return min(cap, math.ceil(length / multiple) * multiple)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype, kernel: str, kv_heads: int, units: int) -> torch.Tensor:
    """(R, n) bool -> the additive mask ``attend`` takes for ``kernel``: (R, 1, 1, n) for "sdpa", ``split_bias``'s
    pieces for "split"; (R, W, n) (a window, "sdpa") -> (R, 1, W, n)."""
    if kernel == "split":
        splits = num_splits(allowed.shape[0] * kv_heads, allowed.shape[1], units)
        return split_bias(allowed, kv_heads, splits, dtype)
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    bias = torch.where(allowed, zero, float("-inf"))
    return bias[:, None] if bias.dim() == 3 else bias[:, None, None, :]
