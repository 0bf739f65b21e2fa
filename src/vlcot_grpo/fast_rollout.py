"""The static rollout engine: the GPU path of ``RolloutEngine`` (``RolloutConfig.engine = "static"``, or ``"auto"`` on
CUDA). Same interface, same state machine, same tokens as the reference path under greedy decoding, and the same
per-position distribution when sampling (see ``tests/test_fast_rollout.py``).

Design
------
Rows. ``R = prompts x num_generations`` conditional rows and, with guidance, ``R`` unconditional rows. Both kinds run
in ONE forward pass per decode step (batch ``2R``).

Conditional cache. One preallocated buffer per layer, ``(R, kv_heads, L, head_dim)``, ``L`` = ``W + max_new_tokens``
rounded up to a multiple of ``kv_bucket``, ``W`` the left-padded prompt width. Each distinct prompt is prefilled once
(transformers' ordinary forward) and its keys/values are copied into its ``num_generations`` rows. Decode step ``t``
writes column ``W + t`` of every row (left padding puts every row's next token at the same column) and attends to the
first ``ceil((W + t + 1) / kv_bucket) * kv_bucket`` columns only. The bucket follows from the step count, so the host
picks it (and its CUDA graph) without a sync.

Guidance cache. The unconditional branch sees only the current image, from its image-start token on, so it gets its
own small buffer ``(R, kv_heads, L_img, head_dim)``, ``L_img`` the longest stage template (rounded up likewise): row
``r`` writes at the index of the fed token inside its current image and a restart is simply that index going back to
0 (the mask hides stale entries; nothing is cleared). Its reads are bucketed as well: at each host check (every
``sync_every`` steps) the longest live image plus ``sync_every`` bounds the slots the next steps can touch. At the
paper's 7B shape (bf16) this buffer is ~12 GB instead of the ~30 GB a full-length one would take.

Why not ``transformers.StaticCache``: it writes one position shared by all rows and hands one key tensor to the
attention, so unconditional rows would need a full-length cache (twice the KV memory) and would read it whole every
step. Here a registered attention function (``vlcot_split``) attends the first ``R`` query rows to the conditional
buffer and the last ``R`` to the guidance buffer; the custom ``cache`` object only writes (``update``). Grouped-query
heads are folded into the query length so keys/values are never repeated. The trade-off: two small attention calls
per layer instead of one, and reads rounded up to a bucket (up to ``kv_bucket - 1`` unused positions per row, plus
``sync_every`` for guidance rows) in exchange for few graphs; nothing reads the full-length buffer for guidance rows.
The kernel is ``decode_attention``: torch's SDPA (with a mask on recent NVIDIA GPUs: cuDNN's kernel) or "split" (SDPA
on pieces of the cache merged by log-sum-exp, flash-decoding style, for few rows: more thread blocks). SDPA measured
fastest at the 7B preset (docs/benchmarks.md). Two more kernels were measured and removed as slower: two batched
matrix products, and flash attention's variable-length form with each row's key count as a device tensor.
The masks are additive (0 / -inf in the model's dtype), made once per step and shared by every layer: a boolean mask
is converted inside every attention call.

Shared prompt cache (``share_prompt_cache``; unset, on wherever it applies). The G rows of a prompt hold the same
prompt keys/values, and above each row reads its own copy every step: at the paper shape (one ~4.2k-token prompt,
G = 5) that is most of the conditional cache bytes a step reads. With the option each prompt's prefill cache is
kept once, (P, kv_heads, W', head_dim) with W' = W rounded up to whole pieces (``prompt_pieces``) and its padding
masked once for the whole call, and the conditional buffers hold only the generated tokens (column = decode step).
Attention then runs twice per layer: the prompt's G rows as G x rep query positions of one attention over each piece
of their prompt (as grouped query heads share a key head; the pieces, as in "split", give every SM work: one block
per (prompt, head) would be 32 blocks at 7B), and each row over its own tokens. Both return log-sum-exps (the private
SDPA ops, as "split") and one small (compiled) kernel merges the pieces and the row's own part. Fewer bytes are read
per step and the prompt's cache is held once; the price is a second attention call and the merge in every layer
(measured: the saving wins, docs/benchmarks.md).

Sampling and state. Text and code candidates are computed for every row every step (fixed shapes) by
``vlcot_grpo.sampling``, as the reference path computes them (guidance, entropy, top-k, temperature for codes; top-k,
temperature, top-p, min-p for text; ``topk`` with the largest k the rule can give instead of a full sort), then
drawn by the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, which
samples from ``p`` exactly and is what ``torch.multinomial`` itself computes for one sample (after a validity check
that reads the device: the per-token sync this avoids). The noise is drawn from the caller's generator into two
static buffers (text, then codes, as the reference path draws) before each step, outside any graph, so any
generator works and, where ``torch.multinomial`` is that race, a seeded run repeats the reference path's samples (and
their sampling log-probs and top-k, kept in two more static buffers)
(up to float rounding of the logits, which differs between the attention paths and can flip a near-tie). Forced
layout tokens, image-code masking and the stage state machine are in-place tensor ops; the host reads the device
only every ``sync_every`` steps ("every row done?" and the longest live image, in one transfer). Steps run after the
last row finished only add padding, which ``_collect`` trims exactly as for the reference path.

CUDA graphs (``device.type == "cuda"`` and ``cuda_graphs``). The whole decode step (state machine, sampling, forward,
cache writes) is captured once per (conditional bucket, guidance bucket) pair when first needed, after an eager
warm-up run on a side stream that is rolled back (its cache writes land where the real step writes next). Graphs
share one memory pool and live for one ``generate`` call, so the KV memory is released before training resumes; the
price is capturing again at every call (``StaticDecoder.capture_seconds`` says how long that takes). On the CPU the
same step runs eagerly; its capture-readiness is checked there by tracing it with ``torch.compile(fullgraph=True)``.

Compiled layers (``compile_step``; unset, on wherever the step is a CUDA graph). ``torch.compile`` (inductor) fuses
the small kernels of each layer (norms, rotary, activations, residuals), each a few microseconds even inside a graph,
to about half as many (docs/benchmarks.md). What is compiled is each decoder layer (regional compilation: one compiled code for all layers, so compile time does not grow
with depth) and the sampling function; the cache writes and the split attention stay outside, since they index
per-layer buffers. The code is compiled with dynamic shapes once per process (a new bucket or row count does not
compile again; share_prompt_cache's small merge may, for new prompt or generation counts) and used for the decode
steps only; prefill and training run the eager modules. The first step of a
``generate`` call compiles or checks guards (``compile_seconds``), then the CUDA graphs capture the compiled kernels.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from vlcot_grpo.models import CODE
from vlcot_grpo.sampling import log_prob_of, sampler_settings, step_scores
from vlcot_grpo.vlcot import STAGES

logger = logging.getLogger(__name__)

ATTENTION_NAME = "vlcot_split"


# ----- attention over the two caches ---------------------------------------------------------------------------------
@dataclass
class _SplitKV:
    """Per-layer static caches and what the current step may read of them. Passed to the model as ``cache=`` and,
    through transformers' attention kwargs, to ``split_attention``."""

    keys: list[torch.Tensor]  # (R, kv_heads, L, head_dim) per layer
    values: list[torch.Tensor]
    mask: torch.Tensor | None  # (R, L) bool: the conditional rows' valid columns (None with shared prompts)
    column: torch.Tensor  # (1,) long: the column this step writes
    rows: int
    read_len: int = 0  # conditional columns read this step (a bucket)
    # Additive masks (0 / -inf, the model's dtype) of this step, made once per step for every layer: a boolean mask
    # would be converted inside each attention call, two extra kernels per call.
    bias: torch.Tensor | None = None  # (R, 1, 1, read_len)
    guide_keys: list[torch.Tensor] | None = None  # (R, kv_heads, L_img, head_dim) per layer
    guide_values: list[torch.Tensor] | None = None
    guide_slot: torch.Tensor | None = None  # (R,) long: the slot each guidance row writes this step
    guide_index: torch.Tensor | None = None  # guide_slot as a scatter index (R, kv_heads, 1, head_dim), set each step
    guide_bias: torch.Tensor | None = None  # (R, 1, 1, guide_read_len), set each step
    guide_read_len: int = 0
    kernel: str = "sdpa"
    # share_prompt_cache: each prompt's keys/values once, read together by its ``generations`` rows; ``keys`` and
    # ``values`` then hold only the generated tokens and ``column`` is the decode step.
    prompt_keys: list[torch.Tensor] | None = None  # (P, kv_heads, W', head_dim) per layer, W' = W in whole pieces
    prompt_values: list[torch.Tensor] | None = None
    # split_bias's (P x kv_heads, pieces, 1, W' / pieces): left padding and rounding hidden by a finite mask (a wholly
    # masked piece must get weight 0; with -inf the CPU kernel returns log-sum-exp 0 for it)
    prompt_bias: torch.Tensor | None = None
    generations: int = 1
    merge: Callable[..., torch.Tensor] | None = None  # merge_shared_attention, compiled under compile_step

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """transformers' cache hook: write this step's keys/values in place. Attention reads the buffers itself."""
        r = self.rows
        self.keys[layer_idx].index_copy_(2, self.column, key_states[:r])
        self.values[layer_idx].index_copy_(2, self.column, value_states[:r])
        if self.guide_keys is not None:  # scatter, not advanced-index assignment: one kernel instead of several
            self.guide_keys[layer_idx].scatter_(2, self.guide_index, key_states[r:])
            self.guide_values[layer_idx].scatter_(2, self.guide_index, value_states[r:])
        return key_states, value_states

    def attend(self, query, layer: int, scaling, guide: bool):
        """``query`` (B, H, 1, D) of the conditional rows (or, ``guide``, the guidance rows) against their cache."""
        keys = (self.guide_keys if guide else self.keys)[layer]
        values = (self.guide_values if guide else self.values)[layer]
        n = self.guide_read_len if guide else self.read_len
        bias = self.guide_bias if guide else self.bias
        keys, values = keys.narrow(2, 0, n), values.narrow(2, 0, n)
        if self.prompt_keys is not None and not guide:
            prompt = (self.prompt_keys[layer], self.prompt_values[layer], self.prompt_bias)
            return _attend_shared(query, *prompt, keys, values, bias, self.generations, scaling, self.merge)
        return _attend(query, keys, values, bias, scaling, self.kernel)


def _attend(query, keys, values, bias, scaling, kernel="sdpa"):
    """One-token attention of ``query`` (B, H, 1, D) to ``keys``/``values`` (B, Hkv, L, D) under the additive mask
    ``bias`` (B, 1, 1, L).

    ``kernel``: "sdpa" (torch's fused attention; with a mask on recent NVIDIA GPUs that is cuDNN's kernel, one block per
    (row, head): few blocks for a decode step), "split" (the same kernel on pieces of the cache, merged by their
    log-sum-exps, as flash-decoding does; ``bias`` is then ``split_bias``'s (B * Hkv, pieces, 1, L / pieces)). Which
    one streams the cache faster is a GPU measurement (``benchmarks/rollout.py --compare-attention``)."""
    b, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    # Query heads that share a key/value head become that head's "query positions": no repeat of the cache.
    q = query.reshape(b, kv_heads, heads // kv_heads, dim)
    if kernel == "split":
        return _split_kv_attention(q, keys, values, bias, scaling).reshape(b, heads, 1, dim)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scaling).reshape(b, heads, 1, dim)


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


def _attention_with_lse(q, k, v, bias, scale):
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


def _split_kv_attention(q, keys, values, bias, scaling):
    """``q`` (B, Hkv, rep, D) against ``keys``/``values`` (B, Hkv, L, D) cut into ``bias.shape[1]`` pieces
    (``split_bias``). Returns (B * Hkv, rep, D)."""
    b, kv_heads, rep, dim = q.shape
    pairs, splits, _, piece = bias.shape
    # (B, Hkv) merge into one batch dim and the positions into (splits, piece): views of the cache, no copy
    k = keys.flatten(0, 1).unflatten(1, (splits, piece))
    v = values.flatten(0, 1).unflatten(1, (splits, piece))
    qs = q.unsqueeze(2).expand(b, kv_heads, splits, rep, dim).reshape(pairs, splits, rep, dim)  # one small copy
    parts, lse = _attention_with_lse(qs, k, v, bias.expand(pairs, splits, rep, piece), scaling)
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
    piece = _bucket(math.ceil(width / math.ceil(width / target)), SPLIT_ALIGN, 1 << 62)
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


_compiled_merge = torch.compile(merge_shared_attention, dynamic=True)


def _attend_shared(query, prompt_keys, prompt_values, prompt_bias, keys, values, bias, generations, scaling, merge):
    """``share_prompt_cache``: ``query`` (R, H, 1, D), rows in prompt order (R = P x ``generations``), against its
    prompt's keys (P, Hkv, W', D), read once for all the prompt's rows in the pieces of ``prompt_bias`` (the "split"
    mask, ``split_bias``: (P x Hkv, pieces, 1, W' / pieces)), and its own generated keys (R, Hkv, n, D) under
    ``bias`` (R, 1, 1, n). The parts are merged by ``merge`` (``merge_shared_attention``)."""
    r, heads, _, dim = query.shape
    prompts, kv_heads = prompt_keys.shape[:2]
    pairs, pieces, _, piece = prompt_bias.shape
    rep, n = heads // kv_heads, keys.shape[2]
    q = query.reshape(r, kv_heads, rep, dim)
    # A prompt's rows become ``generations x rep`` query positions of one attention over each piece of that prompt,
    # as grouped query heads do: one pass over the prompt instead of one per row.
    grouped = q.view(prompts, generations, kv_heads, rep, dim).transpose(1, 2).reshape(pairs, 1, -1, dim)
    queries = grouped.expand(pairs, pieces, generations * rep, dim).contiguous()  # small: a copy per piece
    k = prompt_keys.view(pairs, pieces, piece, dim)
    v = prompt_values.view(pairs, pieces, piece, dim)
    mask = prompt_bias.expand(pairs, pieces, generations * rep, piece)
    prompt_out, prompt_lse = _attention_with_lse(queries, k, v, mask, scaling)
    own_out, own_lse = _attention_with_lse(q, keys, values, bias.expand(r, kv_heads, rep, n), scaling)
    # detached: the same data, no longer views; a compiled merge would otherwise guard on the sizes of their bases
    parts = (t.detach() for t in (prompt_out, prompt_lse, own_out, own_lse))
    return merge(*parts).reshape(r, heads, 1, dim)


def split_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered as ``vlcot_split``: conditional rows read the conditional cache, guidance rows
    (the second half of the batch) the guidance cache. Returns (batch, 1, heads, head_dim) like transformers' SDPA."""
    kv: _SplitKV = kwargs["vlcot_kv"]
    layer, r = module.layer_idx, kv.rows
    out = kv.attend(query[:r], layer, scaling, guide=False)
    if kv.guide_keys is not None:
        out = torch.cat([out, kv.attend(query[r:], layer, scaling, guide=True)])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, split_attention)

# compile_step compiles each decoder layer, and all layers must share one compiled code. The cache writes and the
# split attention index per-layer buffers by ``layer_idx``: traced, they would give every layer its own code (and
# hit dynamo's recompile limit), so under compile_step they run outside the compiled regions.
OPAQUE_ATTENTION_NAME = "vlcot_split_opaque"
AttentionInterface.register(OPAQUE_ATTENTION_NAME, torch.compiler.disable(split_attention))


class _OpaqueSplitKV(_SplitKV):
    update = torch.compiler.disable(_SplitKV.update)


@contextmanager
def _attention_implementation(model, name: str):
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


# ----- sampling ------------------------------------------------------------------------------------------------------
def sample_tokens(logits, uncond_logits, text_mask, code_mask, text_noise, code_noise, *, do_sample, settings):
    """This step's text token and image code per row, as ``RolloutEngine`` draws them (``sampling.step_scores``)
    but without a host sync: an exponential race on the noise. Returns (text token, its sampling log-prob, code,
    its sampling log-prob, the codes' top-k)."""
    text, codes, k = step_scores(logits, uncond_logits, text_mask, code_mask, settings)
    return (*_race(text, text_noise, do_sample), *_race(codes, code_noise, do_sample), k)


def _race(scores, noise, do_sample):
    if not do_sample:
        token = scores.argmax(-1)
        return token, torch.zeros(token.shape, dtype=torch.float32, device=token.device)
    # an exact 0 from exponential_ would turn a zero probability into NaN, which argmax prefers
    token = (torch.softmax(scores, -1) / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(-1)
    return token, log_prob_of(scores, token)


def _bucket(length: int, bucket: int, cap: int) -> int:
    return min(cap, math.ceil(length / bucket) * bucket)


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The modules that hold an attention layer (``layer_idx``) directly: transformers' decoder layers."""
    named = dict(model.named_modules())
    parents = []
    for name, module in named.items():
        if hasattr(module, "layer_idx") and "." in name:
            parent = named[name.rsplit(".", 1)[0]]
            if parent not in parents:
                parents.append(parent)
    return parents


@contextmanager
def _compiled_layers(model):
    """Decoder layers compiled (inductor, dynamic shapes) for the decode steps only: prefill and training keep the
    eager modules. All layers share one compiled code (their parameters are inputs, ``layer_idx`` an unspecialised
    int), kept by dynamo for the process, so the next rollout does not compile again."""
    layers = _decoder_layers(model)
    before = [layer._compiled_call_impl for layer in layers]  # what nn.Module.compile sets (None: eager)
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            yield
    finally:
        for layer, impl in zip(layers, before):
            layer._compiled_call_impl = impl


_compiled_sample_tokens = torch.compile(sample_tokens, dynamic=True)


# ----- fused projections (``fuse_projections``) ---------------------------------------------------------------------
# A decode step multiplies ~10 rows by each weight matrix, so every product is a pass over its weights. q, k and v
# (and gate and up) read the same input: one product over their concatenated weights makes one pass with more thread
# blocks instead of three, and cuBLAS splits the narrower products along K with an extra reduction kernel each
# (docs/benchmarks.md counts them). The modules keep their names and call order: the first
# computes every output, the others hand back their part.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _FusedFirst(torch.nn.Module):
    def __init__(self, weight, bias, sizes):
        super().__init__()
        self.weight, self.bias, self.sizes = weight, bias, sizes
        self.rest: list[torch.Tensor] | None = None

    def forward(self, x):
        first, *self.rest = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        return first


class _FusedRest(torch.nn.Module):
    def __init__(self, first: _FusedFirst, index: int):
        super().__init__()
        self.source = [first]  # in a list: not a submodule of its own
        self.index = index

    def forward(self, x):
        first = self.source[0]
        out = first.rest[self.index]
        if self.index == len(first.sizes) - 2:  # the last part: release the outputs
            first.rest = None
        return out


def _plain_linear(module) -> torch.nn.Linear | None:
    """The ``nn.Linear`` that computes exactly what ``module`` does: itself, or the base layer of a LoRA layer whose
    adapters are merged (``rollout_merge_adapters``); None for anything else (unmerged LoRA, quantized layers)."""
    if type(module) is torch.nn.Linear:
        return module
    base = getattr(module, "base_layer", None)
    if type(base) is torch.nn.Linear and getattr(module, "merged", False) and not module.disable_adapters:
        return base
    return None


def _concatenated(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for a group of linear maps of the same input: the copy ``fuse_projections`` costs."""
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return weight, bias


@contextmanager
def _fused_projections(model, on_out_of_memory: Callable[[Exception], None] | None = None):
    """Within: in each decoder layer, each group of ``FUSED_GROUPS`` that compute plain linear maps of one input
    (``_plain_linear``) runs as one matrix product. Costs a copy of those weights while it lasts. If
    the copies do not fit: with ``on_out_of_memory`` it is called and nothing is fused, else the error is raised."""
    groups = []
    parents = [m for layer in _decoder_layers(model) for m in layer.modules()]  # not e.g. a VQ model's attention
    for parent in parents:
        for names in FUSED_GROUPS:
            modules = [getattr(parent, name, None) for name in names]
            linears = [_plain_linear(m) for m in modules]
            if any(m is None for m in linears):
                continue
            first_linear = linears[0]
            if any(
                m.in_features != first_linear.in_features or m.weight.dtype != first_linear.weight.dtype
                for m in linears
            ):
                continue
            if len({m.bias is None for m in linears}) != 1:
                continue
            groups.append((parent, names, modules, linears))
    try:  # every copy before any swap: running out of memory halfway leaves the model as it was
        fused = [_FusedFirst(*_concatenated(linears), [m.out_features for m in linears]) for *_, linears in groups]
    except torch.OutOfMemoryError as err:
        if on_out_of_memory is None:
            err.add_note("fuse_projections (rollout_fuse_projections): set it false to run without the copy")
            raise
        on_out_of_memory(err)
        groups, fused = [], []
    swapped = []
    for (parent, names, modules, _), first in zip(groups, fused):
        for i, (name, module) in enumerate(zip(names, modules)):
            setattr(parent, name, first if i == 0 else _FusedRest(first, i - 1))
            swapped.append((parent, name, module))
    try:
        yield len(swapped)
    finally:
        for parent, name, module in swapped:
            setattr(parent, name, module)


# ----- the decoder ---------------------------------------------------------------------------------------------------
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream of the warm-ups before capture: one per device for the process. cuBLAS keeps a workspace for every
    stream it has run on, allocated through torch's caching allocator and never returned; a fresh stream per capture
    left its workspace behind per graph, until torch's pool of 32 streams came round."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _summary(err: Exception) -> str:
    """ "Type: first line of the message", for a warning or an error that wraps ``err``."""
    message = str(err)
    return f"{type(err).__name__}: {message.splitlines()[0] if message else ''}"


class CompileStepError(RuntimeError):
    """The first compiled decode step failed (``compile_step``): inductor cannot build its kernels here."""


class StaticDecoder:
    """One ``generate`` call of the static engine; holds the buffers and graphs of that call."""

    def __init__(self, engine, device):
        self.engine = engine
        self.model = engine.model
        self.config = engine.config
        self.device = torch.device(device)
        self.guided = self.config.guidance_scale != 1.0
        self.units = compute_units(self.device)  # the "split" attention kernel sizes its pieces by it
        self.use_graphs = self.config.uses_cuda_graphs(self.device)
        # after a failed compile (RolloutEngine.compile_failure) the engine's later calls run uncompiled
        self.compile = self.config.resolved_compile(self.device) and engine.compile_failure is None
        # likewise after the fused weights did not fit where fuse_projections was left unset
        self.fuse = self.config.resolved_fuse(self.device) and engine.fuse_failure is None
        self.shared = False  # share_prompt_cache, decided in _setup (it needs num_generations > 1)
        self.sample = _compiled_sample_tokens if self.compile else sample_tokens
        self.sampler_settings = sampler_settings(self.config)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        #: (conditional bucket, guidance bucket) of every decode step run, for benchmarks and tests
        self.buckets_used: list[tuple[int, int]] = []
        self.prefill_seconds = 0.0
        self.compile_seconds = 0.0  # compile_step: the first (rolled-back) step, which compiles or loads the code
        self.capture_seconds = 0.0
        self.graphs_captured = 0

    @torch.no_grad()
    def run(self, prompt_ids, num_generations: int = 1, generator: torch.Generator | None = None):
        cfg, device = self.config, self.device
        max_new = cfg.max_new_tokens
        start = time.perf_counter()
        self._setup(prompt_ids, num_generations, device)
        if device.type == "cuda":  # once per call, so that the timings below mean something
            torch.cuda.synchronize(device)
        self.prefill_seconds = time.perf_counter() - start
        s = self.state
        if max_new <= 0:
            return self._collect(prompt_ids, num_generations, 0)
        sync_every = cfg.sync_every
        guide_len = 0
        steps = 0
        with self.decoding():
            if self.compile:  # compile outside the timed steps and before any capture
                start = time.perf_counter()
                try:
                    self._rolled_back_step((self._read_bucket(0), self._guide_bucket(0)))
                except torch._dynamo.exc.TorchDynamoException as err:  # compiling; other errors are not its
                    raise CompileStepError(
                        "compile_step (rollout_compile / upscale --compile): the first compiled decode step failed "
                        f"({_summary(err)}); "
                        "the rollout runs without it when the option is off"
                    ) from err
                self.compile_seconds = time.perf_counter() - start
            while steps < max_new:
                if steps % sync_every == 0:
                    all_done, live = torch.stack([s["done"].all().long(), s["guide_slot"].max()]).tolist()
                    if all_done:
                        break
                    guide_len = self._guide_bucket(live)
                key = (self._read_bucket(steps), guide_len)
                if cfg.do_sample:  # text first, then codes: the order in which the reference path draws
                    s["text_noise"].exponential_(generator=generator)
                    s["code_noise"].exponential_(generator=generator)
                if self.use_graphs:
                    self._graph(key).replay()
                else:
                    self._step(*key)
                self.buckets_used.append(key)
                steps += 1
        batch = self._collect(prompt_ids, num_generations, steps)
        self._release()
        return batch

    def _collect(self, prompt_ids, num_generations: int, steps: int):
        s = self.state
        per_step = (s[name][:, :steps] for name in ("tokens", "sampled"))
        return self.engine._collect(
            prompt_ids,
            num_generations,
            *per_step,
            s["done"],
            s["lengths"],
            s["logprobs"][:, :steps],
            s["top_k"][:, :steps],
        )

    @contextmanager
    def decoding(self):
        """The model as the decode steps need it: the split attention and, with ``compile_step``, compiled layers."""
        name = OPAQUE_ATTENTION_NAME if self.compile else ATTENTION_NAME
        # left unset, fusing is a best effort: without room for the copy the rollout runs unfused
        on_out_of_memory = self._fusing_failed if self.config.fuse_projections is None else None
        fused = _fused_projections(self.model, on_out_of_memory) if self.fuse else nullcontext()
        compiled = _compiled_layers(self.model) if self.compile else nullcontext()
        with _attention_implementation(self.model, name), fused, compiled:
            yield

    def _fusing_failed(self, err: Exception) -> None:
        self.engine.fuse_failure = _summary(err)
        logger.warning(
            "fuse_projections was left unset and the fused copy of the q/k/v and gate/up weights does not fit (%s): "
            "the decode steps run them unfused from now on",
            self.engine.fuse_failure,
        )

    # ----- setup -----------------------------------------------------------------------------------------------
    def _setup(self, prompt_ids, num_generations, device):
        eng, cfg = self.engine, self.config
        cache, attn, positions, logits = eng._prefill_prompts(prompt_ids, device)
        n_prompts, width = attn.shape
        rows = n_prompts * num_generations
        self.shared = cfg.shares_prompt_cache(num_generations)
        # The conditional buffers' first written column: after the prompt, or 0 when they hold only generated tokens.
        self.first_column = 0 if self.shared else width
        # Buffers rounded up to whole buckets: every read is then a multiple of kv_bucket (aligned for the kernels).
        total = _bucket(self.first_column + cfg.max_new_tokens, cfg.kv_bucket, 1 << 62)
        self.rows, self.width = rows, width
        self.kv_cap = total
        template_len = _bucket(int(eng.template_len.max()), cfg.kv_bucket, 1 << 62)
        self.guide_cap = template_len
        keys, values, prompt_keys, prompt_values = [], [], [], []
        if self.shared:
            self.pieces = prompt_pieces(n_prompts * cache.layers[0].keys.shape[1], width, self.units)
        for layer in cache.layers:
            if self.shared:  # the prompt once per prompt; the rows' buffers start empty
                prompt_keys.append(self._prompt_buffer(layer.keys))
                prompt_values.append(self._prompt_buffer(layer.values))
                keys.append(layer.keys.new_zeros((rows, layer.keys.shape[1], total, layer.keys.shape[3])))
                values.append(layer.values.new_zeros((rows, layer.values.shape[1], total, layer.values.shape[3])))
            else:  # each prompt's keys/values go to its num_generations rows without a repeated temporary
                keys.append(self._buffer(layer.keys, n_prompts, num_generations, total))
                values.append(self._buffer(layer.values, n_prompts, num_generations, total))
            layer.keys = layer.values = None  # free the prefill cache layer by layer
        del cache
        mask = None
        if not self.shared:  # the shared cache masks the prompt once (prompt_bias) and the rows' own tokens per step
            mask = torch.zeros((rows, total), dtype=torch.bool, device=device)
            mask[:, :width] = attn.bool().repeat_interleave(num_generations, 0)
        vocab = logits.shape[-1]
        self.kv = (_OpaqueSplitKV if self.compile else _SplitKV)(
            keys=keys,
            values=values,
            mask=mask,
            column=torch.full((1,), self.first_column, dtype=torch.long, device=device),
            rows=rows,
            kernel=cfg.decode_attention,
        )
        if self.shared:
            self.kv.prompt_keys, self.kv.prompt_values = prompt_keys, prompt_values
            visible = F.pad(attn.bool(), (0, prompt_keys[0].shape[2] - width))  # the rounding columns stay hidden
            kv_heads, dtype = prompt_keys[0].shape[1], prompt_keys[0].dtype
            self.kv.prompt_bias = split_bias(visible, kv_heads, self.pieces[0], dtype)
            self.kv.generations = num_generations
            self.kv.merge = _compiled_merge if self.compile else merge_shared_attention
            self.step_range = torch.arange(total, device=device)
        if self.guided:
            self.kv.guide_keys = [k.new_zeros(k.shape[:2] + (template_len, k.shape[3])) for k in keys]
            self.kv.guide_values = [v.new_zeros(v.shape[:2] + (template_len, v.shape[3])) for v in values]
        # Everything a step reads or writes, as fixed buffers: graphs replay on their addresses.
        self.state = {
            "stage": eng._initial_stage(prompt_ids, num_generations).to(device),
            "tpos": torch.zeros(rows, dtype=torch.long, device=device),
            "done": torch.zeros(rows, dtype=torch.bool, device=device),
            "restart": torch.full((rows,), self.first_column, dtype=torch.long, device=device),
            "positions": positions[:, -1].repeat_interleave(num_generations, 0).clone(),
            "step": torch.zeros(1, dtype=torch.long, device=device),
            # cloned: a view of the prefill logits would make torch.compile guard on their base's sizes
            "logits": logits.float().repeat_interleave(num_generations, 0).clone(),
            "uncond_logits": torch.zeros((rows, vocab), dtype=torch.float32, device=device),
            "guide_slot": torch.zeros(rows, dtype=torch.long, device=device),
            "text_noise": torch.ones((rows, vocab), dtype=torch.float32, device=device),
            "code_noise": torch.ones((rows, vocab), dtype=torch.float32, device=device),
            "tokens": torch.full((rows, max(cfg.max_new_tokens, 0)), eng.pad_id, dtype=torch.long, device=device),
            "sampled": torch.zeros((rows, max(cfg.max_new_tokens, 0)), dtype=torch.bool, device=device),
            "logprobs": torch.zeros((rows, max(cfg.max_new_tokens, 0)), dtype=torch.float32, device=device),
            "top_k": torch.zeros((rows, max(cfg.max_new_tokens, 0)), dtype=torch.long, device=device),
            "lengths": torch.zeros(rows, dtype=torch.long, device=device),
        }
        self.kv.guide_slot = self.state["guide_slot"]
        self.templates = eng.templates.to(device)
        self.template_len = eng.template_len.to(device)
        self.open_ids = eng.open_ids.to(device)
        self.text_mask = eng.text_mask.to(device)
        self.code_mask = eng.code_mask.to(device)
        self.slot_range = torch.arange(template_len, device=device)
        self.guide_index_shape = (rows, keys[0].shape[1], 1, keys[0].shape[3])

    def _buffer(self, prefilled, n_prompts: int, num_generations: int, total: int) -> torch.Tensor:
        """A static cache buffer for one layer, ``prefilled`` (prompts, kv_heads, width, dim) copied into each
        prompt's rows: (rows, kv_heads, total, dim)."""
        n, kv_heads, width, dim = prefilled.shape
        buffer = prefilled.new_zeros((n * num_generations, kv_heads, total, dim))
        buffer.view(n, num_generations, kv_heads, total, dim)[:, :, :, :width] = prefilled[:, None]
        return buffer

    def _prompt_buffer(self, prefilled: torch.Tensor) -> torch.Tensor:
        """share_prompt_cache: the prompts' prefilled keys or values (P, kv_heads, W, dim), once per prompt, in a
        buffer of whole pieces (``prompt_pieces``); the extra positions are masked."""
        pieces, piece = self.pieces
        n, kv_heads, width, dim = prefilled.shape
        buffer = prefilled.new_zeros((n, kv_heads, pieces * piece, dim))  # contiguous: attention views it in pieces
        buffer[:, :, :width] = prefilled
        return buffer

    def _read_bucket(self, steps: int) -> int:
        """Conditional columns read by the decode step after ``steps`` steps: the written ones, in whole buckets."""
        return _bucket(self.first_column + steps + 1, self.config.kv_bucket, self.kv_cap)

    def _guide_bucket(self, live: int) -> int:
        """Guidance slots read until the next host check, ``live`` the longest live image now (0 without guidance):
        slots grow by at most one a step, so the next ``sync_every`` steps stay within live + sync_every + 1."""
        if not self.guided:
            return 0
        return _bucket(live + self.config.sync_every + 1, self.config.kv_bucket, self.guide_cap)

    def _release(self):
        self.graphs.clear()
        self.graph_pool = None
        self.kv = None
        self.state = None

    # ----- one decode step (graph-capturable: fixed shapes, in-place writes, no host reads) ----------------------
    def _step(self, read_len: int, guide_read_len: int) -> None:
        eng, cfg, s = self.engine, self.config, self.state
        stage, tpos, done = s["stage"], s["tpos"], s["done"]
        column = self.kv.column

        in_image = stage >= 0
        safe_stage = stage.clamp(min=0)
        forced = self.templates[safe_stage, tpos.clamp(max=self.templates.shape[1] - 1)]
        is_code = in_image & (forced == CODE)
        is_forced = in_image & ~is_code

        text_tok, text_lp, code_tok, code_lp, k = self.sample(
            s["logits"],
            s["uncond_logits"] if self.guided else None,
            self.text_mask,
            self.code_mask,
            s["text_noise"],
            s["code_noise"],
            do_sample=cfg.do_sample,
            settings=self.sampler_settings,
        )
        token = torch.where(is_code, code_tok, torch.where(is_forced, forced, text_tok))
        token = torch.where(done, torch.full_like(token, eng.pad_id), token)
        sampled = ~done & ~is_forced
        s["tokens"].index_copy_(1, s["step"], token[:, None])
        s["sampled"].index_copy_(1, s["step"], sampled[:, None])
        logp = torch.where(sampled, torch.where(is_code, code_lp, text_lp), 0.0)
        s["logprobs"].index_copy_(1, s["step"], logp[:, None])
        s["top_k"].index_copy_(1, s["step"], torch.where(sampled & is_code, k, 0)[:, None])
        s["lengths"].add_((~done).long())

        # The state machine, exactly as the reference path.
        starts_image = in_image & (tpos == 0)
        restart = torch.where(starts_image, column.expand_as(s["restart"]), s["restart"])
        new_tpos = torch.where(in_image, tpos + 1, tpos)
        image_done = in_image & (new_tpos >= self.template_len[safe_stage])
        finished_chain = image_done & (stage == len(STAGES) - 1)
        new_stage = torch.where(image_done, torch.full_like(stage, -1), stage)
        new_tpos = torch.where(image_done, torch.zeros_like(new_tpos), new_tpos)
        opens_at = token[:, None] == self.open_ids[None]
        opens = ~in_image & ~done & opens_at.any(-1)
        new_stage = torch.where(opens, opens_at.long().argmax(-1), new_stage)
        ends_text = ~in_image & ((token == eng.final_close_id) | (token == eng.eos_id))
        done.logical_or_(finished_chain | ends_text)
        stage.copy_(new_stage)
        tpos.copy_(new_tpos)
        s["restart"].copy_(restart)

        # Feed the token. A guidance row's context is its current image only: it writes at the token's index in that
        # image; rows not inside a started image write slot 0, and their guidance logits are never used.
        s["positions"].add_(1)
        self.kv.read_len = read_len
        if self.shared:  # the generated tokens so far; every row has as many (one mask row per row, as SDPA's),
            # never none: the step's own key is written before attention, so -inf is safe here
            allowed = self.step_range.narrow(0, 0, read_len) <= column
            self.kv.bias = self._additive(allowed.expand(self.rows, read_len))
        else:
            self.kv.mask.index_fill_(1, column, True)
            self.kv.bias = self._additive(self.kv.mask.narrow(1, 0, read_len))
        feed, positions = token, s["positions"]
        if self.guided:
            live = (new_stage >= 0) & (new_tpos > 0)
            slot = torch.where(live, column - restart, torch.zeros_like(restart))
            s["guide_slot"].copy_(slot)
            self.kv.guide_read_len = guide_read_len
            self.kv.guide_index = slot[:, None, None, None].expand(self.guide_index_shape)
            self.kv.guide_bias = self._additive(self.slot_range.narrow(0, 0, guide_read_len)[None] <= slot[:, None])
            feed = torch.cat([token, token])
            positions = torch.cat([positions, slot])
        out = self.model(
            input_ids=feed[:, None],
            position_ids=positions[:, None],
            cache=self.kv,
            use_cache=True,
            vlcot_kv=self.kv,
        )
        step_logits = out.logits[:, -1]
        s["logits"].copy_(step_logits[: self.rows])
        if self.guided:
            s["uncond_logits"].copy_(step_logits[self.rows :])
        s["step"].add_(1)
        column.add_(1)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """(R, n) bool -> (R, 1, 1, n) additive mask in the model's dtype (the "split" kernel: ``split_bias``)."""
        dtype = self.kv.keys[0].dtype
        if self.config.decode_attention == "split":
            kv_heads = self.kv.keys[0].shape[1]
            splits = num_splits(allowed.shape[0] * kv_heads, allowed.shape[1], self.units)
            return split_bias(allowed, kv_heads, splits, dtype)
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, float("-inf"))[:, None, None, :]

    # ----- CUDA graphs ---------------------------------------------------------------------------------------------
    def _graph(self, key: tuple[int, int]):
        graph = self.graphs.get(key)
        if graph is not None:
            return graph
        start = time.perf_counter()
        # Warm up outside capture (lazy kernel/handle set-up) on a side stream, as torch's CUDA-graph notes ask.
        side = _side_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._rolled_back_step(key)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        saved = self._snapshot()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            self._step(*key)
        self._restore(*saved)  # capture records without running; this only guards against a backend that runs
        self.graphs[key] = graph
        self.graphs_captured += 1
        self.capture_seconds += time.perf_counter() - start
        return graph

    def _rolled_back_step(self, key: tuple[int, int]) -> None:
        """Run a decode step and undo it. Its cache writes are not undone: they land at the column and guidance
        slots that the real step writes next, before anything reads them, so only the small state needs restoring."""
        saved = self._snapshot()
        self._step(*key)
        self._restore(*saved)

    def _snapshot(self):
        keep = ("tokens", "sampled", "logprobs", "top_k", "text_noise", "code_noise")  # written before being read
        return {name: t.clone() for name, t in self.state.items() if name not in keep}, self.kv.column.clone()

    def _restore(self, saved, saved_column):
        for name, t in saved.items():
            self.state[name].copy_(t)
        self.kv.column.copy_(saved_column)
