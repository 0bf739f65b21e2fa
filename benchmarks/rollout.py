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

import torch
import torch.nn.functional as F
from transformers import GenerationMixin

from vlcot_grpo.models import load_backend
from vlcot_grpo.models.tiny import TINY_FAMILIES
from vlcot_grpo.rollout import DECODE_ATTENTION, RolloutConfig, RolloutEngine
from vlcot_grpo.vlcot import STAGES

PRESETS = {
    # Emu3 presets: a VQ shape of their own, with random weights (the shipped tiny VQ fits the tiny model only)
    "tiny": {
        "max_position_embeddings": 16384,
        "vq_channel_multiplier": (1, 1, 2, 2),
        "codebook_size": 256,
        "vq_weights": "random",
    },
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "intermediate_size": 5632,
        "max_position_embeddings": 16384,
        "codebook_size": 32768,
        "vq_channel_multiplier": (1, 1, 2, 2),
        "vq_weights": "random",
    },
    "7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "max_position_embeddings": 16384,
        "codebook_size": 73609,  # + 119 text/special tokens = the reference's vocabulary of 73728
        "vq_channel_multiplier": (1, 1, 2, 2),
        "vq_weights": "random",
    },
    "pure-tiny": {"family": "pure", "max_position_embeddings": 16384},
    "janus-tiny": {"family": "janus", "max_position_embeddings": 16384, "vq_channel_multiplier": (1, 1, 2, 2, 4)},
    # Janus-Pro-1B / -7B: DeepSeek-LLM language models (multi-head attention, vocabulary 102400), LlamaGen VQ-16
    "janus-1b": {
        "family": "janus",
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "intermediate_size": 5632,
        "max_position_embeddings": 16384,
        "codebook_size": 16384,
        "vq_base_channels": 128,
        "vq_channel_multiplier": (1, 1, 2, 2, 4),
        "vq_latent_channels": 256,
        "vq_num_res_blocks": 2,
        "vocab_size": 102400,  # Janus-Pro's text table; the tiny tokenizer's ids are its first rows
    },
    "janus-7b": {
        "family": "janus",
        "hidden_size": 4096,
        "num_hidden_layers": 30,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "max_position_embeddings": 16384,
        "codebook_size": 16384,
        "vq_base_channels": 128,
        "vq_channel_multiplier": (1, 1, 2, 2, 4),
        "vq_latent_channels": 256,
        "vq_num_res_blocks": 2,
        "vocab_size": 102400,
    },
    "pure-7b": {
        "family": "pure",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "max_position_embeddings": 16384,
        "codebook_size": 16384,  # LlamaGen VQ-8 (vq_ds8_c2i.pt)
        "vq_base_channels": 128,
        "vq_latent_channels": 256,
        "vq_num_res_blocks": 2,
        "vocab_size": 73728,  # PURE's published vocabulary; filler tokens stand in for the text it does not need
    },
}
#: copy bandwidth (TB/s) used for the roofline when the device is named so and --bandwidth is not given:
#: H200 as measured in ../shared/REFERENCE.md section 2; H100 SXM's 3.35 TB/s spec scaled by the same measured/spec
#: ratio (4.24 / 4.8). Anything else: measured here with a device-to-device copy.
BANDWIDTH_TBS = {"H200": 4.24, "H100": 2.96}


def build_preset(name: str, device: torch.device, dtype: torch.dtype):
    """(model, backend) of a preset with random weights, built directly on ``device`` and cast to ``dtype``."""
    fields = dict(PRESETS[name])
    spec_class, build = TINY_FAMILIES[fields.pop("family", "emu3")]
    with torch.device(device):
        model, tokenizer = build(spec_class(**fields))
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model, load_backend(model, tokenizer)


def make_prompts(backend, n: int, lr_size: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts: a short instruction, a random LR image's tokens, ``<rough_image>``; lengths differ by a few."""
    gen = torch.Generator().manual_seed(seed)
    grid = backend.grid_for(lr_size, lr_size)
    prompts = []
    for i in range(n):
        codes = torch.randint(0, backend.codebook_size, grid, generator=gen)
        text = backend.encode_text("Restore this image" + "!" * i + ": ")
        image = backend.codes_to_token_ids(codes).tolist()
        prompts.append(backend.bos_token_ids + text + image + [backend.tag_ids["<rough_image>"]])
    return prompts


def add_chain_hooks(model, backend):
    """Make a random model write the whole chain: after ``</rough_image>`` / ``</middle_image>`` the next stage's
    opening tag gets +100. Graph-capturable (tensor ops only). Returns the hook handles."""
    table = torch.full((backend.vocab_size,), -1, dtype=torch.long)
    table[backend.tag_ids["</rough_image>"]] = backend.tag_ids["<middle_image>"]
    table[backend.tag_ids["</middle_image>"]] = backend.tag_ids["<final_image>"]
    table = table.to(next(model.parameters()).device)
    last = {}

    def pre(module, args, kwargs):
        ids = args[0] if args else kwargs["input"]
        last["ids"] = ids[:, -1]

    def post(module, inputs, output):
        nxt = table[last["ids"]]
        bonus = torch.zeros_like(output[:, -1])
        bonus.scatter_(-1, nxt.clamp(min=0)[:, None], (nxt >= 0).to(bonus.dtype)[:, None] * 100.0)
        output = output.clone()
        output[:, -1] += bonus
        return output

    return [
        model.get_input_embeddings().register_forward_pre_hook(pre, with_kwargs=True),
        backend.logits_module.register_forward_hook(post),
    ]


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


#: What a decode step does not read: each family's VQ model; Janus's understanding encoder and its aligner, and the
#: codes' input table, of which a step looks up one row.
VQ_MODULES = (
    "model.vqmodel.",
    "image_tokenizer.",
    "model.vision_model.",
    "model.aligner.",
    "model.generation_embeddings.",
)


def model_bytes(model) -> tuple[int, int]:
    """(language-model weight bytes read per decode step, KV bytes per token per row). A step looks up a few rows
    of the input embedding table, so that table counts only where it is also the output layer (tied)."""
    lookup = model.get_input_embeddings().weight
    tied = lookup is model.get_output_embeddings().weight
    weights = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if not n.startswith(VQ_MODULES) and (tied or p is not lookup)
    )
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return weights, 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem


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
def rollout_config(args, engine_name, max_new=None) -> RolloutConfig:
    return RolloutConfig(
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


def run_engine(model, backend, prompts, args, device, engine_name, max_new=None) -> dict:
    engine = RolloutEngine(model, backend, rollout_config(args, engine_name, max_new))
    gen = torch.Generator(device).manual_seed(0)
    reset_peak(device)
    sync(device)
    decoder = None
    start = time.perf_counter()
    if engine_name == "static":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from vlcot_grpo.fast_rollout import StaticDecoder

        decoder = StaticDecoder(engine, device)
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--group", type=int, default=5, help="samples per prompt, G (paper: 5)")
    parser.add_argument("--prompts", type=int, default=1, help="distinct prompts (paper: 1 per GPU)")
    parser.add_argument("--lr-size", type=int, default=512, help="LR prompt image side in pixels (paper: 512)")
    parser.add_argument(
        "--stage-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[128, 256, 512],
        help="rough,middle,final",
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
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is the fast setting
    device = torch.device(args.device)
    if args.compile is None:
        args.compile = RolloutConfig(cuda_graphs=not args.no_graphs).resolved_compile(device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    measured = measure_bandwidth(device)
    bandwidth = args.bandwidth or next((v for k, v in BANDWIDTH_TBS.items() if k in name), measured)
    results = {
        "command": "python benchmarks/rollout.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": name,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "preset": args.preset,
        "dtype": str(dtype),
        "bandwidth_tbs_used": bandwidth,
        "bandwidth_tbs_measured_copy": measured,
        "runs": [],
    }
    import transformers

    results["versions"]["transformers"] = transformers.__version__

    def save():  # after every section: a device run cut short by its time limit keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    start = time.perf_counter()
    model, backend = build_preset(args.preset, device, dtype)
    weights, kv_token = model_bytes(model)
    results.update(build_seconds=time.perf_counter() - start, weight_gb=weights / 1e9, kv_mb_per_token=kv_token / 1e6)
    prompts = make_prompts(backend, args.prompts, args.lr_size)
    handles = add_chain_hooks(model, backend)
    print(
        f"# {args.preset} on {name} ({dtype}); weights {weights / 1e9:.2f} GB, KV {kv_token / 1e6:.3f} MB/token; "
        f"roofline bandwidth {bandwidth:.2f} TB/s (copy measured {measured:.2f})",
        flush=True,
    )

    # short runs first: a device run cut off by its time limit still has numbers
    if args.compare_attention:
        results["attention_kernels"] = {}
        # untimed: lazy set-up (kernel libraries, allocator) would otherwise be charged to the first variant
        warm = argparse.Namespace(
            **{**vars(args), "compile": False, "attention": "sdpa", "fuse": False, "share": False}
        )
        run_engine(model, backend, prompts, warm, device, "static", 16)
        for variant in args.compare_kernels.split(","):
            kernel, *flags = variant.split("+")
            try:
                if set(flags) - VARIANT_FLAGS:
                    raise ValueError(f"--compare-kernels {variant!r}: flags are {sorted(VARIANT_FLAGS)}")
                short = argparse.Namespace(
                    **{
                        **vars(args),
                        "attention": kernel,
                        "compile": "compile" in flags,
                        "fuse": "fused" in flags,
                        "share": "shared" in flags,
                        "sdpa_efficient": "efficient" in flags,
                    }
                )
                stats, _ = run_engine(model, backend, prompts, short, device, "static", args.compare_attention)
                rate = stats["decode_steps_run"] / stats["decode_seconds"]
                results["attention_kernels"][variant] = {"decode_steps_per_s": rate, **stats}
                print(
                    f"attention {variant}: {rate:.1f} decode steps/s over {args.compare_attention} tokens "
                    f"(compile {stats['compile_seconds']:.1f} s, capture {stats['capture_seconds']:.1f} s)",
                    flush=True,
                )
            except Exception as err:
                traceback.print_exc()
                results["attention_kernels"][variant] = {"error": repr(err)}
            save()
    if args.attention == "auto":
        # the fastest variant compiled as asked; --fuse, --share and the SDPA backend follow it unless given
        rates = {
            k: v["decode_steps_per_s"]
            for k, v in results.get("attention_kernels", {}).items()
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
    # not given and not decided by a comparison: as the library decides
    library = RolloutConfig(decode_attention=args.attention, kv_bucket=args.kv_bucket, cuda_graphs=not args.no_graphs)
    args.fuse = library.resolved_fuse(device) if args.fuse is None else args.fuse
    args.share = library.shares_prompt_cache(args.group) if args.share is None else args.share
    results["attention_used"] = args.attention + ("+efficient" if getattr(args, "sdpa_efficient", False) else "")
    if args.profile_step:
        results["step_profile"] = {}
        for compiled in sorted({False, args.compile}):
            name = "compiled" if compiled else "eager"
            try:
                short = argparse.Namespace(**{**vars(args), "compile": compiled})
                results["step_profile"][name] = profile_step(model, backend, prompts, short, device)
                print(f"decode step profile ({name}):", json.dumps(results["step_profile"][name]), flush=True)
            except Exception as err:
                traceback.print_exc()
                results["step_profile"][name] = {"error": repr(err)}
            save()
    if args.profile_step:
        try:
            rows = args.group * args.prompts * (2 if args.guidance != 1.0 else 1)
            results["gemm_bandwidth"] = gemm_bandwidth(model, rows, device)
            print(
                "matrix products, weight TB/s:", {k: round(v["tbs"], 2) for k, v in results["gemm_bandwidth"].items()}
            )
        except Exception as err:
            traceback.print_exc()
            results["gemm_bandwidth"] = {"error": repr(err)}
        save()
    if args.attention_options and device.type == "cuda":
        try:
            results["attention_options"] = attention_options(model, args.group * args.prompts, device)
            for length, options in results["attention_options"].items():
                for name, r in options.items():
                    shown = r.get("error") or f"{r['tbs']:.2f} TB/s, {r['us']:.0f} us, max err {r['max_err']:.1e}"
                    print(f"attention option, {length} positions, {name}: {shown}", flush=True)
        except Exception as err:
            traceback.print_exc()
            results["attention_options"] = {"error": repr(err)}
        save()
    results["compiled"], results["fused_projections"] = args.compile, args.fuse
    results["shared_prompt_cache"] = args.share
    print(
        f"static engine decode attention: {args.attention}{', compiled' if args.compile else ''}"
        f"{', fused projections' if args.fuse else ''}{', shared prompt cache' if args.share else ''}",
        flush=True,
    )
    if args.stock_steps > 1:
        try:
            stats = run_stock(model, backend, prompts, args, device)
            steps = args.stock_steps
            guide = [(t + 2) * stats["rows"] for t in range(steps)] if args.guidance != 1.0 else [0] * steps
            ideal = ideal_seconds(steps, stats["rows"], stats["prompt_tokens"], guide, weights, kv_token, bandwidth)
            stats.update(
                decode_steps_per_s=(steps - 1) / stats["decode_seconds"],
                tokens_per_s=stats["rows"] * (steps - 1) / stats["decode_seconds"],
                steps_per_s_whole_call=steps / stats["seconds_total"],
                roofline_fraction=ideal * (steps - 1) / steps / stats["decode_seconds"],
            )
            results["runs"].append(stats)
            report(stats)
        except Exception as err:
            traceback.print_exc()
            results["runs"].append({"engine": "stock generate", "error": repr(err)})
        save()
    for engine_name in [e for e in args.engines.split(",") if e]:
        try:
            stats, batch = run_engine(model, backend, prompts, args, device, engine_name)
            steps = stats["steps"]
            guide = guidance_context(backend, batch.completion_ids, steps) if args.guidance != 1.0 else [0] * steps
            decode = stats.get("decode_seconds", stats["seconds_total"])
            ideal = ideal_seconds(steps, stats["rows"], stats["prompt_tokens"], guide, weights, kv_token, bandwidth)
            if engine_name == "static" and rollout_config(args, engine_name).shares_prompt_cache(args.group):
                read = ideal_seconds(
                    steps, stats["rows"], stats["prompt_tokens"], guide, weights, kv_token, bandwidth, args.prompts
                )
                stats.update(
                    roofline_fraction_read=read / decode,
                    roofline_fraction_read_whole_call=read / stats["seconds_total"],
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
            results["runs"].append(stats)
            report(stats)
            save()
        except Exception as err:  # one failing engine must not cost the others' numbers on a device run
            traceback.print_exc()
            results["runs"].append({"engine": engine_name, "error": repr(err)})
    ours = [r for r in results["runs"] if r.get("engine") == "static" and "decode_steps_per_s" in r]
    stock = [r for r in results["runs"] if r.get("engine", "").startswith("stock") and "decode_steps_per_s" in r]
    if ours and stock:
        results["speedup_vs_stock"] = ours[0]["decode_steps_per_s"] / stock[0]["decode_steps_per_s"]
        print(f"static / stock decode steps/s: {results['speedup_vs_stock']:.1f}x", flush=True)
    for h in handles:
        h.remove()
    if args.grpo_step:  # the short merge check first: a run cut off by its time limit still has it
        handles = add_chain_hooks(model, backend)
        peft_model = add_lora(model, backend)
        if args.lora_merge_check:
            try:
                results["lora_rollout_steps_per_s"] = lora_merge_check(peft_model, backend, prompts, args, device)
                print("LoRA rollout steps/s:", results["lora_rollout_steps_per_s"], flush=True)
            except Exception as err:
                traceback.print_exc()
                results["lora_rollout_steps_per_s"] = {"error": repr(err)}
            save()
        try:
            results["grpo_step"] = grpo_step(peft_model, backend, prompts, args, device)
            print("grpo step:", json.dumps(results["grpo_step"], indent=None), flush=True)
        except Exception as err:
            traceback.print_exc()
            results["grpo_step"] = {"error": repr(err)}
    save()
    return results


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
