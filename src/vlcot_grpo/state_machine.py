"""The per-row state machine of a VLCoT rollout, as pure tensor functions both engines call.

A row is in text mode (``stage`` -1) or inside stage ``stage``'s image at template index ``tpos``:

* text mode: the sampled text token is written. An image-opening tag (``<rough_image>``, ...) enters that stage's
  template; EOS or ``</final_image>`` ends the row.
* image mode: a forced template position takes its layout token, a ``CODE`` position the sampled code. Past the
  template's end (its closing tag, and after the final image EOS) the row is back in text mode, or done.

``restart`` is the column of the current image's start token: the unconditional branch of guidance sees only the
tokens from there on. Every function here has fixed shapes and no host reads, so the static engine can capture it in
a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from vlcot_grpo.models import CODE, ImageTokenBackend
from vlcot_grpo.vlcot import STAGES

__all__ = ["ChainLayout", "RowState", "StepTokens", "advance", "choose_tokens", "guidance_slot"]


@dataclass(frozen=True)
class ChainLayout:
    """The fixed tables of the state machine: one template per stage (image layout + closing tag, padded into one
    (stages, max_len) tensor), the opening tags and the ids that end a row."""

    templates: torch.Tensor
    template_len: torch.Tensor
    open_ids: torch.Tensor
    final_close_id: int
    eos_id: int  # -1 where the tokenizer has none
    pad_id: int

    @classmethod
    def from_backend(cls, backend: ImageTokenBackend, stage_sizes: dict[str, tuple[int, int]]) -> ChainLayout:
        tags = backend.tag_ids
        eos_id = backend.eos_token_id if backend.eos_token_id is not None else -1
        pad_id = backend.tokenizer.pad_token_id if backend.tokenizer.pad_token_id is not None else eos_id
        templates = []
        for stage in STAGES:
            tail = [tags[f"</{stage}_image>"]]
            if stage == STAGES[-1] and eos_id >= 0:
                tail.append(eos_id)  # the chain is complete: end the completion so it reads as terminated
            layout = backend.image_template(*backend.grid_for(*stage_sizes[stage]))
            templates.append(torch.cat([layout, torch.tensor(tail)]))
        return cls(
            templates=torch.nn.utils.rnn.pad_sequence(templates, batch_first=True, padding_value=pad_id),
            template_len=torch.tensor([len(t) for t in templates]),
            open_ids=torch.tensor([tags[f"<{s}_image>"] for s in STAGES]),
            final_close_id=tags["</final_image>"],
            eos_id=eos_id,
            pad_id=pad_id,
        )

    def to(self, device) -> ChainLayout:
        tensors = {name: getattr(self, name).to(device) for name in ("templates", "template_len", "open_ids")}
        return ChainLayout(**tensors, final_close_id=self.final_close_id, eos_id=self.eos_id, pad_id=self.pad_id)

    def initial_stage(self, prompt_ids: list[list[int]], num_generations: int) -> torch.Tensor:
        """-1 per row, or the stage whose image-opening tag ends the row's prompt (that row starts in image mode)."""
        opens = self.open_ids.tolist()
        stage = torch.full((len(prompt_ids) * num_generations,), -1, dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            if ids and ids[-1] in opens:
                stage[i * num_generations : (i + 1) * num_generations] = opens.index(ids[-1])
        return stage

    def image_positions(self, completion_ids: list[int], last_prompt_id: int) -> list[int]:
        """Each completion token's index in the image being written (0 = its image-start token), -1 outside images,
        as ``advance`` walks them."""
        opens, lengths = self.open_ids.tolist(), self.template_len.tolist()
        stage = opens.index(last_prompt_id) if last_prompt_id in opens else -1
        out, tpos = [], 0
        for token in completion_ids:
            if stage < 0:
                out.append(-1)
                stage = opens.index(token) if token in opens else -1
                continue
            out.append(tpos)
            tpos += 1
            if tpos >= lengths[stage]:
                stage, tpos = -1, 0
        return out


class RowState(NamedTuple):
    """Per row (R,): ``stage`` (-1 = text), ``tpos`` (template index), ``done``, ``restart`` (see module doc)."""

    stage: torch.Tensor
    tpos: torch.Tensor
    done: torch.Tensor
    restart: torch.Tensor


class StepTokens(NamedTuple):
    """What a step writes per row: the token, whether the model chose it (not forced, not padding), its sampling
    log-prob (0 where not sampled) and the codes' top-k (0 except at sampled codes)."""

    token: torch.Tensor
    sampled: torch.Tensor
    logprob: torch.Tensor
    top_k: torch.Tensor


def choose_tokens(state: RowState, layout: ChainLayout, text, text_logprob, code, code_logprob, top_k) -> StepTokens:
    """Each row's token from the step's sampled text token and code: forced layout token, code or text; padding
    for rows already done."""
    in_image = state.stage >= 0
    templates = layout.templates
    forced = templates[state.stage.clamp(min=0), state.tpos.clamp(max=templates.shape[1] - 1)]
    is_code = in_image & (forced == CODE)
    is_forced = in_image & ~is_code
    token = torch.where(is_code, code, torch.where(is_forced, forced, text))
    token = torch.where(state.done, torch.full_like(token, layout.pad_id), token)
    sampled = ~state.done & ~is_forced
    logprob = torch.where(sampled, torch.where(is_code, code_logprob, text_logprob), 0.0)
    return StepTokens(token, sampled, logprob, torch.where(sampled & is_code, top_k, 0))


def advance(state: RowState, layout: ChainLayout, token: torch.Tensor, column: torch.Tensor) -> RowState:
    """The state after each row wrote ``token`` at sequence index ``column`` (a 0-d or (1,) tensor)."""
    stage, tpos, done = state.stage, state.tpos, state.done
    in_image = stage >= 0
    safe_stage = stage.clamp(min=0)
    restart = torch.where(in_image & (tpos == 0), column, state.restart)
    new_tpos = torch.where(in_image, tpos + 1, tpos)
    image_done = in_image & (new_tpos >= layout.template_len[safe_stage])
    finished_chain = image_done & (stage == len(STAGES) - 1)
    new_stage = torch.where(image_done, torch.full_like(stage, -1), stage)
    new_tpos = torch.where(image_done, torch.zeros_like(new_tpos), new_tpos)
    opens_at = token[:, None] == layout.open_ids[None]
    opens = ~in_image & ~done & opens_at.any(-1)
    new_stage = torch.where(opens, opens_at.long().argmax(-1), new_stage)
    ends_text = ~in_image & ((token == layout.final_close_id) | (token == layout.eos_id))
    return RowState(new_stage, new_tpos, done | finished_chain | ends_text, restart)


def guidance_slot(state: RowState, column: torch.Tensor) -> torch.Tensor:
    """Where each guidance row writes the token fed at ``column``: its index in the current image. Rows not inside a
    started image write slot 0; their guidance logits are never used."""
    live = (state.stage >= 0) & (state.tpos > 0)
    return torch.where(live, column - state.restart, torch.zeros_like(state.restart))
