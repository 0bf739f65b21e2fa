"""The static engine's key/value caches: three caches with one job each, and the object the model sees.

* ``RowCache``: each row's own keys/values, one preallocated buffer per layer, (R, kv_heads, L, head_dim). Step t
  writes column ``first_column + t`` of every row (left padding puts every row's next token at the same column), and
  a step reads the first ``read_len`` columns only (a whole number of ``kv_bucket``). Without a shared prompt cache the
  buffers start with each row's copy of its prompt (``first_column`` = the prompt width), and a boolean mask hides the
  left padding.
* ``GuidanceCache``: the unconditional rows of classifier-free guidance see only the current image, so they get a
  small buffer, (R, kv_heads, L_img, head_dim), ``L_img`` the longest stage template: a row writes at the index of
  the fed token inside its image, and a new image is that index going back to 0 (stale slots are masked, never
  cleared).
* ``SharedPromptCache`` (``share_prompt_cache``): each prompt's prefill keys/values once, (P, kv_heads, W', head_dim),
  W' the width in whole pieces (``attention.prompt_pieces``), read together by the prompt's G rows; the row caches
  then hold only the generated tokens.

Why not ``transformers.StaticCache``: it writes one position shared by all rows and hands one key tensor to the
attention, so the unconditional rows would need a full-length cache and would read it whole every step.

``DecodeCaches`` holds the three and is passed to the model as ``cache=`` (transformers calls its ``update``) and as
``vlcot_kv`` to the registered attention (``attention.split_attention`` calls its ``attend``). ``begin_step`` builds
the step's view (read lengths, additive masks, guidance slots) in one place, before the forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlcot_grpo.attention import (
    additive_mask,
    attend,
    attend_shared,
    compiled_merge,
    merge_shared_attention,
    split_bias,
)

__all__ = ["DecodeCaches", "GuidanceCache", "RowCache", "SharedPromptCache", "StepView", "build_decode_caches"]


class RowCache:
    """Each row's keys/values (one buffer per layer) and, when the buffers hold the prompts, which columns are valid."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor | None):
        self.keys, self.values = keys, values
        # (R, L) bool, the valid columns, where the buffers start with the prompts; None: only generated tokens,
        # every row has as many and column c is valid once written.
        self.mask = mask
        self.columns = torch.arange(keys[0].shape[2], device=keys[0].device) if mask is None else None

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor) -> None:
        self.keys[layer].index_copy_(2, column, keys)
        self.values[layer].index_copy_(2, column, values)

    def write_window(self, layer: int, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        """A window of W tokens per row at each row's own columns: ``index`` (R, kv_heads, W, head_dim) from
        ``window_index``."""
        self.keys[layer].scatter_(2, index, keys)
        self.values[layer].scatter_(2, index, values)

    def read(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer].narrow(2, 0, n), self.values[layer].narrow(2, 0, n)

    def window_index(self, columns: torch.Tensor) -> torch.Tensor:
        """(R, W) columns -> the scatter index of ``write_window``."""
        r, w = columns.shape
        return columns[:, None, :, None].expand(r, self.keys[0].shape[1], w, self.keys[0].shape[3])

    def visible_window(self, columns: torch.Tensor, first_column: int, n: int) -> torch.Tensor:
        """(R, W, n) bool: what query j of a row's window sees: its prompt (where the buffers hold it) and the
        generated columns up to ``columns[:, j]``. Columns past that may hold rejected drafts of an earlier window:
        never visible, and overwritten before they are."""
        cols = torch.arange(n, device=columns.device)
        allowed = (cols >= first_column) & (cols[None, None] <= columns[:, :, None])
        if self.mask is not None:  # only the prompt is marked: window steps never fill the mask
            allowed = allowed | self.mask.narrow(1, 0, n)[:, None]
        return allowed

    def visible(self, column: torch.Tensor, n: int) -> torch.Tensor:
        """(R, n) bool: the columns this step's queries see, ``column`` (the one written now) included. Never empty:
        the step's own key is written before attention, so an additive -inf mask is safe."""
        if self.mask is None:
            allowed = self.columns.narrow(0, 0, n) <= column
            return allowed.expand(self.keys[0].shape[0], n)
        self.mask.index_fill_(1, column, True)
        return self.mask.narrow(1, 0, n)


class GuidanceCache:
    """The guidance rows' keys/values: slot s of a row is the token at index s of its current image."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.slots = torch.arange(keys[0].shape[2], device=keys[0].device)
        self.index_shape = (keys[0].shape[0], keys[0].shape[1], 1, keys[0].shape[3])

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        # scatter, not advanced-index assignment: one kernel instead of several
        self.keys[layer].scatter_(2, index, keys)
        self.values[layer].scatter_(2, index, values)

    def read(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer].narrow(2, 0, n), self.values[layer].narrow(2, 0, n)

    def index(self, slot: torch.Tensor) -> torch.Tensor:
        """(R,) slots, or (R, W) for a window of tokens per row -> the scatter index of ``write``."""
        if slot.dim() == 2:
            r, w = slot.shape
            return slot[:, None, :, None].expand(r, self.index_shape[1], w, self.index_shape[3])
        return slot[:, None, None, None].expand(self.index_shape)

    def visible(self, slot: torch.Tensor, n: int) -> torch.Tensor:
        """(R, n) bool: the slots up to each row's current one; (R, W, n) for (R, W) slots (a window)."""
        return self.slots.narrow(0, 0, n) <= slot[..., None]


class SharedPromptCache:
    """Each prompt's keys/values once, in whole pieces, and the mask that hides its left padding and rounding."""

    def __init__(self, keys, values, attention_mask: torch.Tensor, pieces: int, generations: int, merge: Callable):
        self.keys, self.values = keys, values
        self.generations = generations
        self.merge = merge
        # the rounding columns stay hidden; a finite mask (split_bias), because a wholly masked piece must get
        # weight 0 (with -inf the CPU kernel returns log-sum-exp 0 for it)
        visible = F.pad(attention_mask.bool(), (0, keys[0].shape[2] - attention_mask.shape[1]))
        self.bias = split_bias(visible, keys[0].shape[1], pieces, keys[0].dtype)

    def attend(self, query, layer: int, own_keys, own_values, own_bias, scaling) -> torch.Tensor:
        prompt = (self.keys[layer], self.values[layer], self.bias)
        return attend_shared(query, *prompt, own_keys, own_values, own_bias, self.generations, scaling, self.merge)


@dataclass
class StepView:
    """What one decode step reads: made by ``DecodeCaches.begin_step``, used by every layer."""

    read_len: int  # row-cache columns read (a bucket)
    bias: torch.Tensor  # the rows' additive mask
    guide_read_len: int = 0
    guide_bias: torch.Tensor | None = None
    guide_index: torch.Tensor | None = None  # the slot each guidance row writes, as a scatter index
    row_index: torch.Tensor | None = None  # window steps: the columns each row writes, as a scatter index


class DecodeCaches:
    """The caches of one static rollout, as the model sees them: the first ``rows`` rows of a forward are the
    conditional rows, the rest (with guidance) their unconditional twins."""

    def __init__(
        self,
        row: RowCache,
        guide: GuidanceCache | None,
        prompt: SharedPromptCache | None,
        *,
        kernel: str,
        units: int,
        column: torch.Tensor,
    ):
        self.row, self.guide, self.prompt = row, guide, prompt
        self.rows = row.keys[0].shape[0]
        self.kernel, self.units = kernel, units
        self.column = column  # (1,) long: the row-cache column this step writes; advanced by the caller
        self.view: StepView | None = None

    def buffers(self) -> list[torch.Tensor]:
        """Every static tensor the caches hold."""
        caches = [c for c in (self.row, self.guide, self.prompt) if c is not None]
        return [t for c in caches for t in c.keys + c.values]

    def begin_step(self, read_len: int, guide_slot: torch.Tensor | None = None, guide_read_len: int = 0) -> None:
        """This step's view: the rows read ``read_len`` columns; guidance rows write ``guide_slot`` and read
        ``guide_read_len`` slots."""
        self.view = StepView(read_len, self._mask(self.row.visible(self.column, read_len)))
        if self.guide is not None:
            self.view.guide_read_len = guide_read_len
            self.view.guide_index = self.guide.index(guide_slot)
            self.view.guide_bias = self._mask(self.guide.visible(guide_slot, guide_read_len))

    def begin_window(
        self,
        read_len: int,
        columns: torch.Tensor,
        first_column: int,
        guide_slots: torch.Tensor | None = None,
        guide_read_len: int = 0,
    ) -> None:
        """The view of a step that feeds W tokens per row (``vlcot_grpo.jacobi``): row i writes its window at
        ``columns[i]`` (R, W), guidance row i at ``guide_slots[i]`` (R, W); query j sees up to its own column."""
        allowed = self.row.visible_window(columns, first_column, read_len)
        self.view = StepView(read_len, self._mask(allowed), row_index=self.row.window_index(columns))
        if self.guide is not None:
            self.view.guide_read_len = guide_read_len
            self.view.guide_index = self.guide.index(guide_slots)
            self.view.guide_bias = self._mask(self.guide.visible(guide_slots, guide_read_len))

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        keys = self.row.keys[0]
        return additive_mask(allowed, keys.dtype, self.kernel, keys.shape[1], self.units)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """transformers' cache hook: write this step's keys/values in place. Attention reads the buffers itself."""
        r = self.rows
        if self.view.row_index is not None:
            self.row.write_window(layer_idx, key_states[:r], value_states[:r], self.view.row_index)
        else:
            self.row.write(layer_idx, key_states[:r], value_states[:r], self.column)
        if self.guide is not None:
            self.guide.write(layer_idx, key_states[r:], value_states[r:], self.view.guide_index)
        return key_states, value_states

    def attend(self, query, layer: int, scaling) -> torch.Tensor:
        """``query`` (B, H, W, D), W = 1 but in window steps: the rows against their row cache (and shared prompt), the guidance rows against
        the guidance cache."""
        r, view = self.rows, self.view
        keys, values = self.row.read(layer, view.read_len)
        if self.prompt is not None:
            out = self.prompt.attend(query[:r], layer, keys, values, view.bias, scaling)
        else:
            out = attend(query[:r], keys, values, view.bias, scaling, self.kernel)
        if self.guide is None:
            return out
        keys, values = self.guide.read(layer, view.guide_read_len)
        return torch.cat([out, attend(query[r:], keys, values, view.guide_bias, scaling, self.kernel)])


class OpaqueDecodeCaches(DecodeCaches):
    """``compile_step`` compiles each decoder layer, and all layers must share one compiled code; the cache writes
    index per-layer buffers by ``layer_idx``, so traced they would give every layer its own code (and hit dynamo's
    recompile limit). They run outside the compiled regions."""

    update = torch.compiler.disable(DecodeCaches.update)


def build_decode_caches(
    prefill,
    attention_mask: torch.Tensor,
    *,
    generations: int,
    length: int,
    guide_length: int,
    shared_pieces: tuple[int, int] | None,
    kernel: str,
    units: int,
    compiled: bool,
    guided: bool,
) -> DecodeCaches:
    """The static caches of a rollout from the prefill cache of its P prompts (a ``DynamicCache``, freed layer by
    layer). ``length``: row-cache columns; ``guide_length``: guidance slots; ``shared_pieces``: (pieces, piece) of the
    shared prompt cache, None to copy each prompt into its rows."""
    n_prompts, width = attention_mask.shape
    rows = n_prompts * generations
    keys, values, prompt_keys, prompt_values = [], [], [], []
    for layer in prefill.layers:
        if shared_pieces is not None:  # the prompt once per prompt; the rows' buffers start empty
            prompt_keys.append(_prompt_buffer(layer.keys, shared_pieces))
            prompt_values.append(_prompt_buffer(layer.values, shared_pieces))
            keys.append(layer.keys.new_zeros((rows, layer.keys.shape[1], length, layer.keys.shape[3])))
            values.append(layer.values.new_zeros((rows, layer.values.shape[1], length, layer.values.shape[3])))
        else:
            keys.append(_row_buffer(layer.keys, generations, length))
            values.append(_row_buffer(layer.values, generations, length))
        layer.keys = layer.values = None  # free the prefill cache layer by layer
    mask = None
    if shared_pieces is None:
        mask = torch.zeros((rows, length), dtype=torch.bool, device=attention_mask.device)
        mask[:, :width] = attention_mask.bool().repeat_interleave(generations, 0)
    prompt = None
    if shared_pieces is not None:
        merge = compiled_merge if compiled else merge_shared_attention
        prompt = SharedPromptCache(prompt_keys, prompt_values, attention_mask, shared_pieces[0], generations, merge)
    guide = None
    if guided:
        guide = GuidanceCache(
            [k.new_zeros(k.shape[:2] + (guide_length, k.shape[3])) for k in keys],
            [v.new_zeros(v.shape[:2] + (guide_length, v.shape[3])) for v in values],
        )
    first_column = 0 if shared_pieces is not None else width
    column = torch.full((1,), first_column, dtype=torch.long, device=attention_mask.device)
    kind = OpaqueDecodeCaches if compiled else DecodeCaches
    return kind(RowCache(keys, values, mask), guide, prompt, kernel=kernel, units=units, column=column)


def _row_buffer(prefilled: torch.Tensor, generations: int, length: int) -> torch.Tensor:
    """``prefilled`` (P, kv_heads, W, dim) copied into each prompt's rows of a (P x generations, kv_heads, length,
    dim) buffer, without a repeated temporary."""
    n, kv_heads, width, dim = prefilled.shape
    buffer = prefilled.new_zeros((n * generations, kv_heads, length, dim))
    buffer.view(n, generations, kv_heads, length, dim)[:, :, :, :width] = prefilled[:, None]
    return buffer


def _prompt_buffer(prefilled: torch.Tensor, pieces: tuple[int, int]) -> torch.Tensor:
    """The prompts' prefilled keys or values (P, kv_heads, W, dim), once per prompt, in a buffer of whole pieces;
    contiguous, because attention views it in pieces."""
    n, kv_heads, width, dim = prefilled.shape
    buffer = prefilled.new_zeros((n, kv_heads, pieces[0] * pieces[1], dim))
    buffer[:, :, :width] = prefilled
    return buffer
