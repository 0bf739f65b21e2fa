"""LoRA adapters merged into the base weights for a rollout, with the exact base weights put back afterwards.

Kept apart from the trainer so that the benchmark (and a GPU machine without TRL) can use the very same code.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _adapted_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.merged and not m.disable_adapters]


def _base_params(layers):
    """("Class.name", parameter) of every base weight under the adapted ``layers``."""
    for layer in layers:
        base = layer.get_base_layer()
        for name, param in base.named_parameters(recurse=False):
            yield f"{type(base).__name__}.{name}", param


def quantized_base(model) -> str | None:
    """The first adapted base weight that is quantized, as "Class.name (dtype)", or None. Merging a LoRA delta into
    quantized weights is lossy, so rollouts of such a model (QLoRA) run on the unmerged adapters."""
    for label, param in _base_params(_adapted_layers(model)):
        if not param.is_floating_point():
            return f"{label} ({param.dtype})"
    return None


@contextmanager
def merged_adapters(model, host_buffers: dict | None = None):
    """Merge ``model``'s active PEFT adapters into their base weights for the block, then put the base weights back
    bit for bit.

    Why: unmerged, every adapted linear adds two small matrix products and an add per decode step, a few microseconds
    each, against a 7B decode step of about 10 ms (measure: ``benchmarks/rollout.py --grpo-step --lora-merge-check``).
    Why not PEFT's ``merge_adapter``/``unmerge_adapter`` alone: unmerging subtracts the delta again, which in bf16 does
    not give back the weights it started from, and the drift would add up over thousands of steps. So the base
    weights are copied to host memory first (pinned when CUDA is there: about 13 GB and a second or two each way at
    7B with every linear adapted) and copied back afterwards. Under ZeRO-3 call it inside the parameter gather.

    ``host_buffers``: a dict kept by the caller between calls; the host copies then live in it and are allocated
    (and, on CUDA, page-locked, which takes seconds at 13 GB) once instead of at every rollout."""
    layers = _adapted_layers(model)
    params = []
    for label, param in _base_params(layers):
        if not param.is_floating_point():
            raise ValueError(
                f"rollout_merge_adapters: {label} is quantized ({param.dtype}); merging "
                "into quantized weights is lossy: turn rollout_merge_adapters off"
            )
        if param.numel() == 0:
            raise ValueError(
                "rollout_merge_adapters: the base weights are partitioned (ZeRO-3 without "
                "ds3_gather_for_generation): merge inside the gather, or turn rollout_merge_adapters off"
            )
        params.append(param)
    cuda = next((p.device for p in params if p.is_cuda), None)
    cache = {} if host_buffers is None else host_buffers
    saved = []
    for index, p in enumerate(params):
        host = cache.get(index)
        if host is None or host.shape != p.shape or host.dtype != p.dtype:
            host = cache[index] = torch.empty(p.shape, dtype=p.dtype, pin_memory=cuda is not None)
        saved.append(host)
    for param, host in zip(params, saved):
        host.copy_(param.detach(), non_blocking=True)
    if cuda is not None:
        torch.cuda.synchronize(cuda)  # the copies must be done before merging overwrites the weights
    merged = []
    try:
        for layer in layers:
            layer.merge()
            merged.append(layer)
        yield model
    finally:
        for layer in merged:
            layer.unmerge()  # resets PEFT's merged state; the exact weights are copied back below
        with torch.no_grad():
            for param, host in zip(params, saved):
                param.copy_(host, non_blocking=True)
        if cuda is not None:
            torch.cuda.synchronize(cuda)
