"""What the static engine does to the model while it decodes: compiled decoder layers (``compile_step``) and fused
projections (``fuse_projections``). Both are context managers that restore the model exactly on exit; prefill and
training always run the eager, unfused modules."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

__all__ = [
    "FUSED_GROUPS",
    "FusedFirst",
    "FusedRest",
    "compiled_layers",
    "concatenated_weights",
    "decoder_layers",
    "fused_projections",
]


def decoder_layers(model) -> list[torch.nn.Module]:
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
def compiled_layers(model):
    """Decoder layers compiled (inductor, dynamic shapes) for the decode steps only: prefill and training keep the
    eager modules. All layers share one compiled code (their parameters are inputs, ``layer_idx`` an unspecialised
    int), kept by dynamo for the process, so the next rollout does not compile again."""
    layers = decoder_layers(model)
    before = [layer._compiled_call_impl for layer in layers]  # what nn.Module.compile sets (None: eager)
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            yield
    finally:
        for layer, impl in zip(layers, before):
            layer._compiled_call_impl = impl


# ----- fused projections (``fuse_projections``) ---------------------------------------------------------------------
# A decode step multiplies ~10 rows by each weight matrix, so every product is a pass over its weights. q, k and v
# (and gate and up) read the same input: one product over their concatenated weights makes one pass with more thread
# blocks instead of three, and cuBLAS splits the narrower products along K with an extra reduction kernel each
# (docs/benchmarks.md counts them). The modules keep their names and call order: the first
# computes every output, the others hand back their part.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedFirst(torch.nn.Module):
    def __init__(self, weight, bias, sizes):
        super().__init__()
        self.weight, self.bias, self.sizes = weight, bias, sizes
        self.rest: list[torch.Tensor] | None = None

    def forward(self, x):
        first, *self.rest = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        return first


class FusedRest(torch.nn.Module):
    def __init__(self, first: FusedFirst, index: int):
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


def concatenated_weights(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for a group of linear maps of the same input: the copy ``fuse_projections`` costs."""
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return weight, bias


@contextmanager
def fused_projections(model, on_out_of_memory: Callable[[Exception], None] | None = None):
    """Within: in each decoder layer, each group of ``FUSED_GROUPS`` that compute plain linear maps of one input
    (``_plain_linear``) runs as one matrix product. Costs a copy of those weights while it lasts. If
    the copies do not fit: with ``on_out_of_memory`` it is called and nothing is fused, else the error is raised."""
    groups = []
    parents = [m for layer in decoder_layers(model) for m in layer.modules()]  # not e.g. a VQ model's attention
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
        fused = [
            FusedFirst(*concatenated_weights(linears), [m.out_features for m in linears]) for *_, linears in groups
        ]
    except torch.OutOfMemoryError as err:
        if on_out_of_memory is None:
            err.add_note("fuse_projections (rollout_fuse_projections): set it false to run without the copy")
            raise
        on_out_of_memory(err)
        groups, fused = [], []
    swapped = []
    for (parent, names, modules, _), first in zip(groups, fused):
        for i, (name, module) in enumerate(zip(names, modules)):
            setattr(parent, name, first if i == 0 else FusedRest(first, i - 1))
            swapped.append((parent, name, module))
    try:
        yield len(swapped)
    finally:
        for parent, name, module in swapped:
            setattr(parent, name, module)
