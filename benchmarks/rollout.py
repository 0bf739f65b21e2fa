"""VLCoT rollout speed: the project's engines against stock ``transformers`` ``generate`` with guidance, same run.

    python benchmarks/rollout.py --preset 7b                     # the goal: paper shape on one H100/H200
    python benchmarks/rollout.py --preset tiny --device cpu      # CPU sanity run (seconds), not a GPU number

Models have random weights (no download). Presets: ``tiny`` (the test model's width, downsample 8), ``1b`` (~0.98 B,
Emu3-shaped, grouped-query attention) and ``7b`` (7.08 B, Lumina-mGPT/Chameleon-shaped: hidden 4096, 32 layers,
32 heads, vocabulary 73728, as in ../shared/REFERENCE.md section 2; built as an Emu3 model of that size). ``pure-7b``
is the paper's own model as this project runs it: the PURE backend (``vlcot_grpo.models.pure``: transformers'
Chameleon 7B with its query/key norms, vocabulary 73728, LlamaGen VQ-8 at its published shape), so the images have
PURE's layout (276, 1060 and 4164 tokens at 128², 256² and 512²); ``pure-tiny`` is its CPU-sized twin.

The paper's rollout shape is the default: G = 5 samples of one 512x512 LR prompt (~4.2k tokens), rough / middle /
final images of 128 / 256 / 512 pixels, guidance 3.0 in transformers' convention (the paper's RL code uses 0.8 in
the same convention; any value other than 1.0 runs the same guidance rows, so the speed is the same), image
temperature 0.9, the paper's entropy-dependent top-k (``vlcot_grpo.sampling``). Random
weights would rarely write a whole chain, so logit hooks force it: the prompt ends with ``<rough_image>`` and each
closing tag is followed by the next stage's opening tag (about 5.5k completion tokens, as in the paper).

Printed per engine: decode steps/s and tokens/s (over the decode phase, and over the whole call with prefill and
graph capture), the memory roofline fraction (time a perfect engine needs to read the weights and the KV cache each
step at ``--bandwidth``, over the measured decode time; every row reading its whole cache, prompt included) and peak
memory. With ``--share`` (share_prompt_cache) the engine reads a prompt once for its G rows, fewer bytes than that
roofline counts, so the fraction of the bytes it does read is printed beside it ("read roofline"). Stock
``generate`` runs the same prompt with ``guidance_scale`` and ``negative_prompt_ids`` (a second, sequential
unconditional pass) for ``--stock-steps`` steps; its decode rate is (N - 1) steps over (time for N new tokens - time
for 1). ``--grpo-step`` adds a LoRA GRPO step split into rollout, log-probs (no grad) and forward + backward.
``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationMixin

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from presets import (  # noqa: E402
    PRESETS,
    add_chain_hooks,
    build_preset,
    load_checkpoint,
    make_prompts,
    model_bytes,
    photo_prompts,
)

from vlcot_grpo.rollout import DECODE_ATTENTION, RolloutConfig, RolloutEngine
from vlcot_grpo.vlcot import STAGES

#: H200 as measured in ../shared/REFERENCE.md section 2; H100 SXM's 3.35 TB/s spec scaled by the same measured/spec
#: ratio (4.24 / 4.8). Anything else: measured here with a device-to-device copy.
BANDWIDTH_TBS = {"H200": 4.24, "H100": 2.96}


# ----- measuring ---------------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # process peak RSS (kB on Linux)


def measure_bandwidth(device) -> float:
    """Device-to-device copy bandwidth, TB/s (bytes read + written)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - start) / 1e12


def ideal_seconds(steps, rows, prompt_len, guide_ctx, weights, kv_token, bandwidth_tbs, prompts=None) -> float:
    """Time to read the weights once per step plus each row's conditional context and, with guidance, its current
    image context, at ``bandwidth_tbs``. ``guide_ctx``: per step, the summed guidance context over rows.
    ``prompts``: the prompt part of the context is read once per prompt, not once per row (share_prompt_cache)."""
    cond = (rows if prompts is None else prompts) * steps * prompt_len + rows * steps * (steps + 1) / 2
    total = steps * weights + (cond + sum(guide_ctx)) * kv_token
    return total / (bandwidth_tbs * 1e12)


def guidance_context(backend, completions, steps) -> list[int]:
    """Per decode step, the sum over rows of the tokens an unconditional row attends to (its image so far)."""
    template = backend.image_template(*backend.smallest_grid).tolist()
    start_id, end_id = template[0], template[-1]
    per_step = [0] * steps
    for ids in completions:
        inside = 0
        for t, tok in enumerate(ids[:steps]):
            inside = 1 if tok == start_id else inside + 1 if inside else 0
            per_step[t] += inside
            if tok == end_id:
                inside = 0
    return per_step


# ----- runs --------------------------------------------------------------------------------------------------------
def rollout_config(args, engine_name, max_new=None, window: int = 1) -> RolloutConfig:
    """The rollout settings of a run; ``window`` > 1: Jacobi decoding with that window."""
    return RolloutConfig(
        image_decoding="jacobi" if window > 1 else "sequential",
        jacobi_window=max(window, 2),
        stage_sizes={s: (size, size) for s, size in zip(STAGES, args.stage_sizes)},
        max_new_tokens=max_new or args.max_new_tokens,
        image_temperature=0.9,
        image_top_k=-1,
        text_temperature=0.9,
        guidance_scale=args.guidance,
        engine=engine_name,
        sync_every=args.sync_every,
        kv_bucket=args.kv_bucket,
        cuda_graphs=not args.no_graphs,
        decode_attention=args.attention,
        compile_step=args.compile,
        fuse_projections=args.fuse,
        share_prompt_cache=bool(getattr(args, "share", False)),
    )


def run_engine(model, backend, prompts, args, device, engine_name, max_new=None, window: int = 1) -> dict:
    engine = RolloutEngine(model, backend, rollout_config(args, engine_name, max_new, window))
    gen = torch.Generator(device).manual_seed(0)
    reset_peak(device)
    sync(device)
    decoder = None
    start = time.perf_counter()
    if engine_name == "static":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from vlcot_grpo.fast_rollout import StaticDecoder
        from vlcot_grpo.jacobi import JacobiDecoder

        decoder = (JacobiDecoder if window > 1 else StaticDecoder)(engine, device)
        # "+efficient": torch's memory-efficient SDPA kernel instead of the one SDPA picks (cuDNN on an H100)
        forced = getattr(args, "sdpa_efficient", False)
        backend_choice = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]) if forced else contextlib.nullcontext()
        with backend_choice:
            batch = decoder.run(prompts, args.group, gen)
    else:
        batch = engine.generate(prompts, args.group, gen)
    sync(device)
    total = time.perf_counter() - start
    steps = max(len(c) for c in batch.completion_ids)
    out = {
        "engine": engine_name,
        "rows": len(batch.completion_ids),
        "prompt_tokens": max(len(p) for p in prompts),
        "steps": steps,
        "completion_tokens_mean": sum(len(c) for c in batch.completion_ids) / len(batch.completion_ids),
        "stage_tokens_mean": {s: sum(v) / len(v) for s, v in batch.stage_tokens.items()},
        "finished": sum(batch.finished),
        # the mean top-k kept at image-code positions: the paper's rule follows the codes' entropy
        "image_top_k_mean": _mean([k for row in batch.top_k for k in row if k > 0]),
        "seconds_total": total,
        "peak_gb": peak_gb(device),
        **batch.decoding,
    }
    if decoder is not None:
        out.update(
            prefill_seconds=decoder.prefill_seconds,
            capture_seconds=decoder.capture_seconds,
            compile_seconds=decoder.compile_seconds,
            graphs=decoder.graphs_captured,
            decode_steps_run=len(decoder.buckets_used),
        )
        decode = total - decoder.prefill_seconds - decoder.compile_seconds - decoder.capture_seconds
        out["decode_seconds"] = decode
    return out, batch


def profile_step(model, backend, prompts, args, device, steps: int = 3) -> dict:
    """The static engine's decode step run eagerly (no graph) under torch.profiler, right after the prompt: on CUDA,
    kernels launched per step, their summed time and the ten kernels that take most of it. Set against the graph
    replay's time per step, that says whether a step is slow in its kernels or between them."""
    from torch.profiler import ProfilerActivity, profile

    from vlcot_grpo.fast_rollout import StaticDecoder

    config = rollout_config(args, "static", 64)  # long enough for the 2 + steps steps run
    decoder = StaticDecoder(RolloutEngine(model, backend, config), device)
    decoder.prepare(prompts, args.group)
    key = (decoder.read_bucket(steps + 1), decoder.guide_bucket(0))  # covers every step run
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with decoder.decoding():
        for _ in range(2):  # lazy set-up (and compilation) outside the profile
            decoder.step(*key)
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                decoder.step(*key)
            sync(device)
    decoder.release()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if kernels:  # on CUDA: the kernels themselves
        timed = [(e.name, e.time_range.elapsed_us()) for e in kernels]
    else:  # on the CPU: aten ops by their own time
        timed = [(e.name, e.self_cpu_time_total) for e in prof.events() if e.name.startswith("aten::")]
    by_name: dict[str, list[float]] = {}
    for name, us in timed:
        by_name.setdefault(name, []).append(us)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:10]
    return {
        "compiled": config.compile_step,
        "fused_projections": config.fuse_projections,
        "read_len": key[0],
        "kernels_per_step" if kernels else "aten_ops_per_step": len(timed) / steps,
        "kernel_ms_per_step" if kernels else "op_ms_per_step": sum(us for _, us in timed) / steps / 1e3,
        "top": [[name[:120], len(us) / steps, sum(us) / steps / 1e3] for name, us in top],
    }


def attention_options(model, rows: int, device, lengths=(4608, 9216), total: int = 9728, reps: int = 20) -> dict:
    """One decode step's attention for ``rows`` conditional rows at this model's shapes, reading ``length`` cached
    positions out of a ``total``-long buffer (the paper shape's), row 0 left-padded (by 100 positions) as with
    prompts of different lengths. The engine's kernel (SDPA under an additive mask over a bucket: cuDNN on an H100)
    against kernels that take each row's start and length as device tensors instead of a mask (flash and
    memory-efficient attention in their variable-length form, on a (rows, positions, heads, dim) buffer). Those
    would need neither the mask nor a CUDA graph per bucket, and read no position past the written one; the engine
    had such a kernel ("varlen", flash) until it measured 0.87x SDPA at 7B on an H100. Per option: the useful KV
    bandwidth (TB/s) and the largest difference from SDPA on exact slices. The variable-length kernels are
    CUDA-only (an error entry elsewhere)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vlcot_grpo.attention import attend
    from vlcot_grpo.fast_rollout import error_summary

    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    rep, dtype, scale = heads // kv_heads, next(model.parameters()).dtype, dim**-0.5
    gen = torch.Generator(device).manual_seed(0)
    keys = torch.randn(rows, total, kv_heads, dim, generator=gen, device=device, dtype=dtype)  # BSHD
    values = torch.randn(rows, total, kv_heads, dim, generator=gen, device=device, dtype=dtype)
    keys_bhsd, values_bhsd = keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()  # the engine's
    query = torch.randn(rows, heads, dim, generator=gen, device=device, dtype=dtype)
    flash_args = torch.ops.aten._flash_attention_forward.default._schema.arguments

    def at(length: int) -> dict:
        pad = [min(100, length // 4) if r == 0 else 0 for r in range(rows)]
        used = torch.tensor([length - p for p in pad], dtype=torch.int32, device=device)
        starts = torch.tensor([r * total + p for r, p in enumerate(pad)] + [rows * total], dtype=torch.int32)
        starts = starts.to(device)
        want = torch.stack(
            [
                F.scaled_dot_product_attention(
                    query[r, :, None],
                    keys_bhsd[r, :, pad[r] : length].repeat_interleave(rep, 0),
                    values_bhsd[r, :, pad[r] : length].repeat_interleave(rep, 0),
                    scale=scale,
                )[:, 0]
                for r in range(rows)
            ]
        )
        allowed = torch.ones(rows, length, dtype=torch.bool, device=device)
        allowed[0, : pad[0]] = False
        bias = torch.zeros(rows, 1, 1, length, dtype=dtype, device=device).masked_fill(
            ~allowed[:, None, None], -torch.inf
        )
        q_fold = query.view(rows, kv_heads, rep, dim)

        def engine_sdpa():  # the engine's own attention call
            k, v = keys_bhsd[:, :, :length], values_bhsd[:, :, :length]
            return attend(query[:, :, None], k, v, bias, scale).reshape(rows, heads, dim)

        def engine_sdpa_efficient():
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return engine_sdpa()

        q_starts = torch.arange(rows + 1, dtype=torch.int32, device=device)
        flat_k, flat_v = keys.view(rows * total, kv_heads, dim), values.view(rows * total, kv_heads, dim)

        def flash_varlen(**extra):  # num_splits where this torch has it
            return torch.ops.aten._flash_attention_forward(
                query,
                flat_k,
                flat_v,
                q_starts,
                starts,
                1,
                length,
                0.0,
                False,
                False,
                scale=scale,
                seqused_k=used,
                **extra,
            )[0]

        # kv heads as heads, rep as positions: the memory-efficient kernel has no grouped heads
        q_efficient = q_fold.transpose(1, 2).reshape(1, rows * rep, kv_heads, dim)

        def efficient_varlen():
            out = torch.ops.aten._efficient_attention_forward(
                q_efficient,
                flat_k[None],
                flat_v[None],
                None,
                q_starts * rep,
                starts,
                rep,
                length,
                0.0,
                0,
                scale=scale,
                seqlen_k=used,
            )[0]
            return out.view(rows, rep, kv_heads, dim).transpose(1, 2).reshape(rows, heads, dim)

        options = {
            "sdpa + mask (the engine's)": engine_sdpa,
            "sdpa + mask, memory-efficient kernel": engine_sdpa_efficient,
            "flash varlen, seqused_k": flash_varlen,
            "memory-efficient varlen, seqlen_k": efficient_varlen,
        }
        if any(a.name == "num_splits" for a in flash_args):
            for splits in (4, 8, 16):
                options[f"flash varlen, seqused_k, num_splits={splits}"] = lambda n=splits: flash_varlen(num_splits=n)
        useful = float(used.sum()) * kv_heads * dim * 2 * keys.element_size()
        timed = {}
        for name, fn in options.items():
            try:
                err = (fn().float() - want.float()).abs().max().item()
                for _ in range(3):
                    fn()
                sync(device)
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                sync(device)
                seconds = (time.perf_counter() - start) / reps
                timed[name] = {"us": seconds * 1e6, "tbs": useful / seconds / 1e12, "max_err": err}
            except Exception as err:
                timed[name] = {"error": error_summary(err)[:200]}
        return timed

    return {length: at(length) for length in lengths}


VARIANT_FLAGS = {"compile", "fused", "efficient", "shared"}


def gemm_bandwidth(model, rows: int, device) -> dict:
    """Weight bandwidth (TB/s) of one decode step's matrix products at this model's shapes, ``rows`` tokens each:
    the projections one by one and fused (q+k+v, gate+up), as a decode step would run them. A matrix product with
    so few rows reads its weight once, so its time is the weight bytes over the rate it streams them."""
    text = model.config.get_text_config()
    hidden, inter = text.hidden_size, text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    kv = 2 * text.num_key_value_heads * head_dim
    dtype = next(model.parameters()).dtype
    shapes = {
        "q or o": (hidden, hidden),
        "k+v": (kv, hidden),
        "gate or up": (inter, hidden),
        "down": (hidden, inter),
        "q+k+v fused": (hidden + kv, hidden),
        "gate+up fused": (2 * inter, hidden),
    }
    reps = 50 if device.type == "cuda" else 3
    out = {}
    for name, (n, k) in shapes.items():
        weight = torch.randn(n, k, dtype=dtype, device=device)
        x = torch.randn(rows, k, dtype=dtype, device=device)
        for _ in range(3):
            torch.nn.functional.linear(x, weight)
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, weight)
        sync(device)
        seconds = (time.perf_counter() - start) / reps
        out[name] = {
            "shape": [rows, k, n],
            "us": seconds * 1e6,
            "tbs": weight.numel() * weight.element_size() / seconds / 1e12,
        }
        del weight, x
    return out


def run_stock(model, backend, prompts, args, device) -> dict:
    """Stock generate with guidance on the same rows: time for 1 and for N new tokens, same sampling settings."""
    rows = [p for p in prompts for _ in range(args.group)]
    width = max(len(p) for p in rows)
    pad = backend.tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    start_id = int(backend.image_template(*backend.smallest_grid)[0])
    kwargs = {"do_sample": True, "temperature": 0.9, "top_k": 2000, "pad_token_id": pad, "eos_token_id": None}
    if args.guidance != 1.0:
        kwargs.update(guidance_scale=args.guidance, negative_prompt_ids=torch.full((len(rows), 1), start_id))
        kwargs["negative_prompt_ids"] = kwargs["negative_prompt_ids"].to(device)
    # Janus's own generate turns guidance off in text mode: the generate every transformers model inherits is the
    # stock baseline for every family
    generate = GenerationMixin.generate.__get__(model)
    times = {}
    reset_peak(device)
    for n in (1, args.stock_steps):
        sync(device)
        start = time.perf_counter()
        generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, **kwargs)
        sync(device)
        times[n] = time.perf_counter() - start
    decode = times[args.stock_steps] - times[1]
    return {
        "engine": "stock generate" + (" + guidance" if args.guidance != 1.0 else ""),
        "rows": len(rows),
        "prompt_tokens": width,
        "steps": args.stock_steps,
        "seconds_first_token": times[1],
        "seconds_total": times[args.stock_steps],
        "decode_seconds": decode,
        "peak_gb": peak_gb(device),
    }


def add_lora(model, backend):
    """The PEFT model the GRPO step trains: LoRA r 16 on the backend's default targets, B = 0 as PEFT initialises."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=16, lora_alpha=32, target_modules=backend.lora_target_modules, lora_dropout=0.0)
    return get_peft_model(model, lora).eval()


def grpo_step(peft_model, backend, prompts, args, device) -> dict:
    """A LoRA GRPO step at the same shape, computed the way ``VLCoTGRPOTrainer`` computes it: rollout (static
    engine, adapters merged for it and the exact base weights restored, the host buffers already allocated as they
    are after the trainer's first step; ``--grpo-unmerged``: through the PEFT layers), then all rows in one batch
    (prompts left-padded, completions right-padded) scored once without grad (the old policy's log-probs, which TRL
    computes when a batch is reused) and once with grad and gradient checkpointing for the clipped-ratio loss and
    its backward. Both scorings run for each ``sampler_correction`` in ``--corrections``: 'none' (and 'importance':
    ``logprobs.completion_logps``) and 'guided' (``logprobs.sampled_logps`` with the unconditional rows of
    ``logprobs.guidance_rows`` in a second forward pass, where guidance is on)."""
    from vlcot_grpo.adapters import merged_adapters

    model = peft_model.get_base_model()
    out = {"rollout_merged": not args.grpo_unmerged}
    buffers: dict = {}
    try:
        if not args.grpo_unmerged:
            with merged_adapters(peft_model, buffers):  # allocates (and page-locks) the host copies, untimed
                pass
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        with contextlib.nullcontext() if args.grpo_unmerged else merged_adapters(peft_model, buffers):
            _, batch = run_engine(peft_model, backend, prompts, args, device, "static")
        sync(device)
        out["rollout_seconds"] = time.perf_counter() - start
        out["rollout_peak_gb"] = peak_gb(device)
        ids, mask, sampled, length = _training_batch(batch, backend, device)
        out["batch"] = list(ids.shape)
        scorer = _Scorer(peft_model, backend, batch, ids, mask, length, rollout_config(args, "static"), device)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        advantages = torch.randn(ids.shape[0], 1, device=device)
        for correction in args.corrections.split(","):
            part = {}
            peft_model.eval()
            reset_peak(device)
            sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                old = scorer(correction)
            sync(device)
            part["logprob_seconds"] = time.perf_counter() - start
            peft_model.train()
            reset_peak(device)
            sync(device)
            start = time.perf_counter()
            ratio = torch.exp(scorer(correction, compute_entropy=True) - old)
            per_token = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
            loss = (per_token * sampled).sum() / sampled.sum().clamp(min=1)
            loss.backward()
            sync(device)
            part["train_seconds"] = time.perf_counter() - start
            part["train_peak_gb"] = peak_gb(device)
            part["step_seconds"] = out["rollout_seconds"] + part["logprob_seconds"] + part["train_seconds"]
            part["step_over_rollout"] = part["step_seconds"] / out["rollout_seconds"]
            part["peak_gb"] = max(out["rollout_peak_gb"], part["train_peak_gb"])
            if correction == "guided":
                part["guidance_rows"] = list(scorer.rows.input_ids.shape) if scorer.rows is not None else None
            out[correction] = part
            peft_model.zero_grad(set_to_none=True)
        if "none" in out and "guided" in out:
            out["guided_over_none_train"] = out["guided"]["train_seconds"] / out["none"]["train_seconds"]
            out["guided_over_none_peak"] = out["guided"]["train_peak_gb"] / max(out["none"]["train_peak_gb"], 1e-9)
    finally:
        model.gradient_checkpointing_disable()
        peft_model.eval()
    return out


class _Scorer:
    """The trainer's log-prob pass over one rollout batch, for a given sampler_correction."""

    def __init__(self, peft_model, backend, batch, ids, mask, length, config, device):
        from vlcot_grpo.sampling import sampler_settings

        self.model, self.backend, self.ids, self.mask, self.length = peft_model, backend, ids, mask, length
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.engine = RolloutEngine(peft_model, backend, config)
        self.settings = sampler_settings(config)
        self.top_k = torch.zeros((ids.shape[0], length), dtype=torch.long)
        for i, row in enumerate(batch.top_k):
            self.top_k[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        self.top_k = self.top_k.to(device)
        self.rows = None

    def __call__(self, correction: str, compute_entropy: bool = False):
        from vlcot_grpo.logprobs import completion_logps, guidance_rows, sampled_logps

        logits = self.model(
            input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions, logits_to_keep=self.length + 1
        ).logits
        targets = self.ids[:, -self.length :]
        masks = {"code_mask": self.backend.image_code_mask, "text_mask": self.backend.text_token_mask}
        if correction != "guided":
            return completion_logps(
                logits[:, :-1],
                targets,
                text_temperature=0.9,
                image_temperature=0.9,
                **masks,
                compute_entropy=compute_entropy,
            )[0]
        uncond, index = None, None
        if self.settings["guidance_scale"] != 1.0:
            self.rows = guidance_rows(self.engine, self.ids, self.mask, self.length)
            uncond = self.model(
                input_ids=self.rows.input_ids,
                attention_mask=self.rows.attention_mask,
                position_ids=self.rows.positions,
            ).logits
            index = self.rows.index
        return sampled_logps(
            logits[:, :-1],
            targets,
            settings=self.settings,
            top_k=self.top_k,
            uncond_logits=uncond,
            uncond_index=index,
            compute_entropy=compute_entropy,
            **masks,
        )[0]


def _training_batch(batch, backend, device):
    """RolloutBatch -> (input ids, attention mask, sampled-token mask, completion length) as TRL pads them."""
    pad = backend.tokenizer.pad_token_id if backend.tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in batch.prompt_ids)
    length = max(len(c) for c in batch.completion_ids)
    rows = len(batch.completion_ids)
    ids = torch.full((rows, width + length), pad, dtype=torch.long)
    mask = torch.zeros((rows, width + length), dtype=torch.long)
    sampled = torch.zeros((rows, length))
    for i, (p, c, m) in enumerate(zip(batch.prompt_ids, batch.completion_ids, batch.sampled_mask)):
        ids[i, width - len(p) : width] = torch.tensor(p)
        ids[i, width : width + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, width - len(p) : width + len(c)] = 1
        sampled[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids.to(device), mask.to(device), sampled.to(device), length


def lora_merge_check(peft_model, backend, prompts, args, device) -> dict:
    """Static-engine decode rate over ``--lora-merge-check`` tokens with the LoRA adapters unmerged and merged the way
    the trainer merges them (``rollout_merge_adapters``), and what one merge + exact restore costs: the first time
    (host buffers allocated and page-locked) and afterwards (the trainer keeps its buffers)."""
    from vlcot_grpo.adapters import merged_adapters

    args_short = argparse.Namespace(**{**vars(args), "max_new_tokens": args.lora_merge_check})
    unmerged, _ = run_engine(peft_model, backend, prompts, args_short, device, "static")
    buffers: dict = {}
    seconds = []
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        with merged_adapters(peft_model, buffers):
            sync(device)
        seconds.append(time.perf_counter() - start)
    with merged_adapters(peft_model, buffers):
        merged, _ = run_engine(peft_model, backend, prompts, args_short, device, "static")
    return {
        "unmerged": unmerged["decode_steps_run"] / unmerged["decode_seconds"],
        "merged": merged["decode_steps_run"] / merged["decode_seconds"],
        "first_merge_and_restore_seconds": seconds[0],
        "merge_and_restore_seconds": seconds[1],
    }


# ----- main --------------------------------------------------------------------------------------------------------
def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--group", type=int, default=5, help="samples per prompt, G (paper: 5)")
    parser.add_argument("--prompts", type=int, default=1, help="distinct prompts (paper: 1 per GPU)")
    parser.add_argument(
        "--lr-size", type=int, default=None, help="LR prompt image side in pixels (default: --checkpoint's, else 512)"
    )
    parser.add_argument(
        "--stage-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="rough,middle,final (default: --checkpoint's, else the paper's 128,256,512)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=7000, help="completion limit (paper: 7000)")
    parser.add_argument("--guidance", type=float, default=3.0, help="transformers' convention, 1.0 = off")
    parser.add_argument("--engines", default="static", help="comma list of project engines: static,reference")
    parser.add_argument("--stock-steps", type=int, default=64, help="new tokens for stock generate (0 = skip)")
    parser.add_argument("--sync-every", type=int, default=32)
    parser.add_argument("--kv-bucket", type=int, default=RolloutConfig.kv_bucket)
    parser.add_argument(
        "--attention",
        choices=["auto", *DECODE_ATTENTION],
        default="auto",
        help="static engine's decode attention; auto: the fastest in --compare-attention (among the compiled variants "
        "with --compile), else the config default",
    )
    parser.add_argument(
        "--compare-attention", type=int, default=0, help="also: static engine, N new tokens, each attention kernel"
    )
    parser.add_argument(
        "--compare-kernels",
        default="sdpa,split",
        help="what --compare-attention runs: kernels, each optionally with '+compile', '+fused' (fuse_projections), "
        "'+shared' (share_prompt_cache) and '+efficient' (CUDA: SDPA's memory-efficient kernel forced), e.g. "
        "sdpa+compile,sdpa+compile+shared",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="static engine: compile_step (torch.compile); default as the library: on with CUDA graphs",
    )
    parser.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="static engine: fuse_projections (q/k/v and gate/up as one product each); default: as the fastest "
        "--compare-kernels variant, else as the library (on with CUDA graphs)",
    )
    parser.add_argument(
        "--share",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="static engine: share_prompt_cache (a prompt's cache held and read once for its G rows); default: as "
        "the fastest --compare-kernels variant, else as the library (on with sdpa and G > 1)",
    )
    parser.add_argument("--no-graphs", action="store_true", help="static engine without CUDA graphs")
    parser.add_argument(
        "--profile-step",
        action="store_true",
        help="also: kernels of one eager decode step (torch.profiler) and the weight bandwidth of its matrix products",
    )
    parser.add_argument(
        "--attention-options",
        action="store_true",
        help="also (CUDA): the decode attention kernels that take row lengths on the device, against the engine's",
    )
    parser.add_argument("--bandwidth", type=float, default=None, help="TB/s for the roofline (default: see top)")
    parser.add_argument("--grpo-step", action="store_true", help="also time a LoRA GRPO step at this shape")
    parser.add_argument(
        "--grpo-unmerged",
        action="store_true",
        help="--grpo-step rolls out through unmerged adapters (default: merged)",
    )
    parser.add_argument(
        "--lora-merge-check", type=int, default=0, help="with --grpo-step, before it: rollout N tokens merged/not"
    )
    parser.add_argument(
        "--corrections",
        default="none,guided",
        help="--grpo-step scores the batch for each sampler_correction listed: 'none' (also importance's pass) and "
        "'guided' (the sampled distribution, an unconditional pass over the images where guidance is on)",
    )
    parser.add_argument(
        "--jacobi-windows",
        default="",
        help="also: the static engine with image_decoding 'jacobi' at each window listed (e.g. 4,8,16) against "
        "sequential decoding, same prompts and seed: forward passes per image token, accepted drafts, decode time, "
        "and one verify step's cost at each window relative to a plain step",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a saved model folder (e.g. the demo's cold start) instead of --preset's random weights, prompted with "
        "the bundled photos and without the chain hooks: acceptance rates mean something only on trained weights",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    return with_checkpoint_settings(parser.parse_args(argv))


def with_checkpoint_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Sizes and prompt a trained ``--checkpoint`` saw (its vlcot_settings.json) where no flag sets them, else the
    paper's: a trained model prompted off its training distribution would not show its real acceptance rates."""
    from vlcot_grpo.saved_settings import read_settings
    from vlcot_grpo.vlcot import DEFAULT_PROMPT

    saved = read_settings(args.checkpoint)
    if args.lr_size is None:
        args.lr_size = saved.get("lr_size", 512)
    if args.stage_sizes is None:
        sizes = saved.get("stage_sizes")
        args.stage_sizes = [sizes[s][0] for s in STAGES] if sizes else [128, 256, 512]
    args.prompt = saved.get("prompt", DEFAULT_PROMPT)
    return args


class Run:
    """What every section reads: the arguments, the model and its prompts, the roofline's figures, and the results
    (written to ``--json`` after every section, so a device run cut short keeps what it measured)."""

    def __init__(self, args, argv):
        self.args = args
        self.device = device = torch.device(args.device)
        if args.compile is None:
            args.compile = RolloutConfig(cuda_graphs=not args.no_graphs).resolved_compile(device)
        self.dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        torch.manual_seed(0)
        import transformers

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        measured = measure_bandwidth(device)
        self.bandwidth = args.bandwidth or next((v for k, v in BANDWIDTH_TBS.items() if k in name), measured)
        self.results = {
            "command": "python benchmarks/rollout.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": name,
            "versions": {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "transformers": transformers.__version__,
            },
            "preset": args.preset,
            "dtype": str(self.dtype),
            "bandwidth_tbs_used": self.bandwidth,
            "bandwidth_tbs_measured_copy": measured,
            "runs": [],
        }
        start = time.perf_counter()
        if args.checkpoint:
            self.model, self.backend = load_checkpoint(args.checkpoint, device, self.dtype)
            self.results["checkpoint"] = args.checkpoint
        else:
            self.model, self.backend = build_preset(args.preset, device, self.dtype)
        self.weights, self.kv_token = model_bytes(self.model)
        self.results.update(
            build_seconds=time.perf_counter() - start,
            weight_gb=self.weights / 1e9,
            kv_mb_per_token=self.kv_token / 1e6,
        )
        if args.checkpoint:
            self.prompts = photo_prompts(self.backend, args.prompts, args.lr_size, args.prompt)
        else:
            self.prompts = make_prompts(self.backend, args.prompts, args.lr_size)
        self._lora = None
        print(
            f"# {args.preset} on {name} ({self.dtype}); weights {self.weights / 1e9:.2f} GB, KV "
            f"{self.kv_token / 1e6:.3f} MB/token; roofline bandwidth {self.bandwidth:.2f} TB/s (copy measured "
            f"{measured:.2f})",
            flush=True,
        )

    def lora_model(self):
        """The model with LoRA adapters (``--grpo-step``), made at first use."""
        if self._lora is None:
            self._lora = add_lora(self.model, self.backend)
        return self._lora

    def save(self) -> None:
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(self.results, f, indent=2)

    def ideal(self, stats: dict, steps: int, guide, prompts=None) -> float:
        """``ideal_seconds`` for a run's ``stats`` (its rows and left-padded prompt width) at this model's sizes."""
        width, rows = stats["prompt_tokens"], stats["rows"]
        return ideal_seconds(steps, rows, width, guide, self.weights, self.kv_token, self.bandwidth, prompts)


# ----- sections ----------------------------------------------------------------------------------------------------
def compare_attention_section(run: Run) -> dict:
    """``--compare-attention``: the static engine over N new tokens with each ``--compare-kernels`` variant."""
    args, out = run.args, {}
    run.results["attention_kernels"] = out
    # untimed: lazy set-up (kernel libraries, allocator) would otherwise be charged to the first variant
    warm = argparse.Namespace(**{**vars(args), "compile": False, "attention": "sdpa", "fuse": False, "share": False})
    run_engine(run.model, run.backend, run.prompts, warm, run.device, "static", 16)
    for variant in args.compare_kernels.split(","):
        kernel, *flags = variant.split("+")
        try:
            if set(flags) - VARIANT_FLAGS:
                raise ValueError(f"--compare-kernels {variant!r}: flags are {sorted(VARIANT_FLAGS)}")
            chosen = {"compile": "compile" in flags, "fuse": "fused" in flags, "share": "shared" in flags}
            short = argparse.Namespace(**{**vars(args), "attention": kernel, **chosen})
            short.sdpa_efficient = "efficient" in flags
            stats, _ = run_engine(
                run.model, run.backend, run.prompts, short, run.device, "static", args.compare_attention
            )
            rate = stats["decode_steps_run"] / stats["decode_seconds"]
            out[variant] = {"decode_steps_per_s": rate, **stats}
            print(
                f"attention {variant}: {rate:.1f} decode steps/s over {args.compare_attention} tokens "
                f"(compile {stats['compile_seconds']:.1f} s, capture {stats['capture_seconds']:.1f} s)",
                flush=True,
            )
        except Exception as err:
            traceback.print_exc()
            out[variant] = {"error": repr(err)}
        run.save()
    return out


def choose_static_options(run: Run) -> str:
    """The static engine's kernel, fusion and prompt sharing for the runs below: as given; with ``--attention
    auto``, the fastest compared variant compiled as asked; else as the library decides."""
    args, device = run.args, run.device
    if args.attention == "auto":
        rates = {
            k: v["decode_steps_per_s"]
            for k, v in run.results.get("attention_kernels", {}).items()
            if "error" not in v
            and ("+compile" in k) == args.compile
            and (args.fuse is None or ("+fused" in k) == args.fuse)
            and (args.share is None or ("+shared" in k) == args.share)
        }
        best = max(rates, key=rates.get).split("+") if rates else [RolloutConfig.decode_attention]
        args.attention, args.sdpa_efficient = best[0], "efficient" in best
        if rates:
            args.fuse = "fused" in best if args.fuse is None else args.fuse
            args.share = "shared" in best if args.share is None else args.share
    library = RolloutConfig(decode_attention=args.attention, kv_bucket=args.kv_bucket, cuda_graphs=not args.no_graphs)
    args.fuse = library.resolved_fuse(device) if args.fuse is None else args.fuse
    args.share = library.shares_prompt_cache(args.group) if args.share is None else args.share
    run.results.update(compiled=args.compile, fused_projections=args.fuse, shared_prompt_cache=args.share)
    print(
        f"static engine decode attention: {args.attention}{', compiled' if args.compile else ''}"
        f"{', fused projections' if args.fuse else ''}{', shared prompt cache' if args.share else ''}",
        flush=True,
    )
    return args.attention + ("+efficient" if getattr(args, "sdpa_efficient", False) else "")


def step_profile_section(run: Run) -> dict:
    """``--profile-step``: one eager decode step's kernels, eager and (if asked) compiled."""
    out = {}
    for compiled in sorted({False, run.args.compile}):
        name = "compiled" if compiled else "eager"
        try:
            short = argparse.Namespace(**{**vars(run.args), "compile": compiled})
            out[name] = profile_step(run.model, run.backend, run.prompts, short, run.device)
            print(f"decode step profile ({name}):", json.dumps(out[name]), flush=True)
        except Exception as err:
            traceback.print_exc()
            out[name] = {"error": repr(err)}
    return out


def gemm_section(run: Run) -> dict:
    """``--profile-step``: the weight bandwidth of the decode step's matrix products."""
    args = run.args
    out = gemm_bandwidth(run.model, args.group * args.prompts * (2 if args.guidance != 1.0 else 1), run.device)
    print("matrix products, weight TB/s:", {k: round(v["tbs"], 2) for k, v in out.items()})
    return out


def attention_options_section(run: Run) -> dict:
    """``--attention-options`` (CUDA): kernels that take row lengths on the device, against the engine's."""
    out = attention_options(run.model, run.args.group * run.args.prompts, run.device)
    for length, options in out.items():
        for name, r in options.items():
            shown = r.get("error") or f"{r['tbs']:.2f} TB/s, {r['us']:.0f} us, max err {r['max_err']:.1e}"
            print(f"attention option, {length} positions, {name}: {shown}", flush=True)
    return out


def stock_section(run: Run) -> dict:
    """``--stock-steps``: transformers' ``generate`` with guidance, the baseline."""
    stats = run_stock(run.model, run.backend, run.prompts, run.args, run.device)
    steps = run.args.stock_steps
    guide = [(t + 2) * stats["rows"] for t in range(steps)] if run.args.guidance != 1.0 else [0] * steps
    ideal = run.ideal(stats, steps, guide)
    stats.update(
        decode_steps_per_s=(steps - 1) / stats["decode_seconds"],
        tokens_per_s=stats["rows"] * (steps - 1) / stats["decode_seconds"],
        steps_per_s_whole_call=steps / stats["seconds_total"],
        roofline_fraction=ideal * (steps - 1) / steps / stats["decode_seconds"],
    )
    report(stats)
    return stats


def engine_section(run: Run, engine_name: str) -> dict:
    """``--engines``: one project engine over the whole chain, against the roofline."""
    args = run.args
    stats, batch = run_engine(run.model, run.backend, run.prompts, args, run.device, engine_name)
    steps = stats["steps"]
    guide = guidance_context(run.backend, batch.completion_ids, steps) if args.guidance != 1.0 else [0] * steps
    decode = stats.get("decode_seconds", stats["seconds_total"])
    ideal = run.ideal(stats, steps, guide)
    if engine_name == "static" and rollout_config(args, engine_name).shares_prompt_cache(args.group):
        read = run.ideal(stats, steps, guide, args.prompts)
        stats.update(
            roofline_fraction_read=read / decode, roofline_fraction_read_whole_call=read / stats["seconds_total"]
        )
    stats.update(
        decode_steps_per_s=stats.get("decode_steps_run", steps) / decode,
        tokens_per_s=stats["rows"] * steps / decode,
        steps_per_s_whole_call=steps / stats["seconds_total"],
        roofline_fraction=ideal / decode,
        # prefill and graph capture counted as waste: the "whole rollout" number of the goal
        roofline_fraction_whole_call=ideal / stats["seconds_total"],
        roofline_steps_per_s=steps / ideal,
    )
    report(stats)
    return stats


def engine_runs_section(run: Run) -> list[dict]:
    """Stock ``generate`` (``--stock-steps``), then each of ``--engines``; each run's numbers kept as it ends."""
    args, runs = run.args, run.results.setdefault("runs", [])
    engines = ["stock generate"] * (args.stock_steps > 1) + [e for e in args.engines.split(",") if e]
    for name in engines:
        try:
            runs.append(stock_section(run) if name == "stock generate" else engine_section(run, name))
        except Exception as err:  # one failing engine must not cost the others' numbers on a device run
            traceback.print_exc()
            runs.append({"engine": name, "error": repr(err)})
        run.save()
    return runs


def speedup_section(run: Run) -> float | None:
    """The static engine's decode steps/s over stock ``generate``'s, where both ran."""
    runs = run.results["runs"]
    ours = [r for r in runs if r.get("engine") == "static" and "decode_steps_per_s" in r]
    stock = [r for r in runs if r.get("engine", "").startswith("stock") and "decode_steps_per_s" in r]
    if not (ours and stock):
        return None
    speedup = ours[0]["decode_steps_per_s"] / stock[0]["decode_steps_per_s"]
    print(f"static / stock decode steps/s: {speedup:.1f}x", flush=True)
    return speedup


def jacobi_section(run: Run) -> dict:
    """``--jacobi-windows``: sequential against Jacobi decoding of image codes on the static engine, in one run:
    forward passes per image token, accepted drafts per step, decode seconds; and one step's cost at each window
    relative to a plain step at the same read length (``step_cost``)."""
    args = run.args
    windows = [1] + [int(w) for w in args.jacobi_windows.split(",") if w]
    out = {"weights": args.checkpoint or f"random ({args.preset})", "runs": []}
    run_engine(run.model, run.backend, run.prompts, args, run.device, "static")  # warm-up: first-call costs
    for window in windows:
        stats, batch = run_engine(run.model, run.backend, run.prompts, args, run.device, "static", window=window)
        image = sum(sum(v) for v in batch.stage_tokens.values())
        row = {
            "window": window,
            "decode_seconds": stats["decode_seconds"],
            "forward_passes": stats["decode_steps_run"],
            "forward_passes_per_image_token": stats.get("forward_passes_per_image_token", 1.0),
            "accepted_drafts_per_step": stats.get("accepted_drafts_per_step", 0.0),
            "image_tokens": image,
            "step_cost": step_cost(run, window) / step_cost(run, 1),
        }
        out["runs"].append(row)
        base = out["runs"][0]
        print(
            f"jacobi window {window:>2}: {row['forward_passes']:>5} forward passes, "
            f"{row['forward_passes_per_image_token']:.3f} per image token, "
            f"{row['accepted_drafts_per_step']:.2f} accepted drafts/step, decode {row['decode_seconds']:.2f} s "
            f"({base['decode_seconds'] / row['decode_seconds']:.2f}x sequential), one step "
            f"{row['step_cost']:.2f}x a plain one",
            flush=True,
        )
    return out


def step_cost(run: Run, window: int, reps: int = 10) -> float:
    """Seconds of one static decode step (a replayed graph on CUDA) right after the prompt, feeding ``window``
    tokens per row (1: the sequential step), at the read lengths of that first step."""
    args = run.args
    engine = RolloutEngine(run.model, run.backend, rollout_config(args, "static", reps * window + 1, window))
    from vlcot_grpo.fast_rollout import StaticDecoder
    from vlcot_grpo.jacobi import JacobiDecoder

    decoder = (JacobiDecoder if window > 1 else StaticDecoder)(engine, run.device)
    with torch.no_grad():
        decoder.prepare(run.prompts, args.group)
        key = (decoder.read_bucket(0), decoder.guide_bucket(0))
        with decoder.decoding():
            one = (lambda: decoder.graphs.replay(key)) if decoder.graphs is not None else (lambda: decoder.step(*key))
            one()  # capture or warm up
            sync(run.device)
            start = time.perf_counter()
            for _ in range(reps):
                one()
            sync(run.device)
            seconds = (time.perf_counter() - start) / reps
    decoder.release()
    return seconds


def lora_merge_section(run: Run) -> dict:
    """``--grpo-step --lora-merge-check N``: rollout steps/s through merged and unmerged adapters."""
    out = lora_merge_check(run.lora_model(), run.backend, run.prompts, run.args, run.device)
    print("LoRA rollout steps/s:", out, flush=True)
    return out


def grpo_section(run: Run) -> dict:
    """``--grpo-step``: one LoRA GRPO step, split into rollout, log-probs and forward + backward."""
    out = grpo_step(run.lora_model(), run.backend, run.prompts, run.args, run.device)
    print("grpo step:", json.dumps(out, indent=None), flush=True)
    return out


#: (results key, whether it runs, the section), in order: short sections first, so that a device run cut off by its
#: time limit still has numbers; the merge check before the GRPO step for the same reason.
SECTIONS = (
    ("attention_kernels", lambda run: run.args.compare_attention, compare_attention_section),
    ("attention_used", lambda run: True, choose_static_options),
    ("step_profile", lambda run: run.args.profile_step, step_profile_section),
    ("gemm_bandwidth", lambda run: run.args.profile_step, gemm_section),
    (
        "attention_options",
        lambda run: run.args.attention_options and run.device.type == "cuda",
        attention_options_section,
    ),
    ("runs", lambda run: True, engine_runs_section),
    ("speedup_vs_stock", lambda run: True, speedup_section),
    ("jacobi", lambda run: run.args.jacobi_windows, jacobi_section),
    ("lora_rollout_steps_per_s", lambda run: run.args.grpo_step and run.args.lora_merge_check, lora_merge_section),
    ("grpo_step", lambda run: run.args.grpo_step, grpo_section),
)


def guarded(run: Run, key: str, section) -> None:
    """``results[key] = section(run)``, or its error: one failing section must not cost the others' numbers."""
    try:
        value = section(run)
        if value is not None:
            run.results[key] = value
    except Exception as err:
        traceback.print_exc()
        run.results[key] = {"error": repr(err)}
    run.save()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is the fast setting
    run = Run(args, argv)
    handles = [] if args.checkpoint else add_chain_hooks(run.model, run.backend)
    for key, runs, section in SECTIONS:
        if runs(run):
            guarded(run, key, section)
    for h in handles:
        h.remove()
    return run.results


def report(stats: dict) -> None:
    line = (
        f"{stats['engine']:<28} rows {stats['rows']:>3}  prompt {stats['prompt_tokens']:>5}  steps {stats['steps']:>5}  "
        f"decode {stats['decode_steps_per_s']:8.1f} steps/s {stats['tokens_per_s']:9.1f} tok/s  "
        f"roofline {100 * stats['roofline_fraction']:5.1f} %  whole call {stats['seconds_total']:7.2f} s "
        f"({stats['steps_per_s_whole_call']:.1f} steps/s)  peak {stats['peak_gb']:.2f} GB"
    )
    if "roofline_fraction_whole_call" in stats:
        line += f"  roofline whole call {100 * stats['roofline_fraction_whole_call']:.1f} %"
    if "roofline_fraction_read" in stats:  # share_prompt_cache: of the bytes this engine needs to read
        line += (
            f"  read roofline {100 * stats['roofline_fraction_read']:.1f} % "
            f"(whole call {100 * stats['roofline_fraction_read_whole_call']:.1f} %)"
        )
    if "graphs" in stats:
        line += f"  [prefill {stats['prefill_seconds']:.2f} s, {stats['graphs']} graphs in {stats['capture_seconds']:.2f} s"
        line += f", compile {stats['compile_seconds']:.1f} s]" if stats.get("compile_seconds") else "]"
    print(line, flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
