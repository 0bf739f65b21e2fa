"""Speculative Jacobi decoding of image codes (SJD, arXiv 2410.01699): more than one code per forward pass, drawn
from the sequential sampler's distribution exactly. ``RolloutConfig.image_decoding = "jacobi"`` runs it on the
static engine; the reference engine stays one token per step and is what it is tested against.

Each decode step feeds every row a window of W tokens: the pending token (chosen last step, not yet fed) and W - 1
drafts of the next template positions: the forced layout token where the template has one, else a code drawn from a
draft distribution q. The forward gives the target distribution p (``sampling.step_scores``: guidance, entropy
top-k, temperature, as the sequential sampler) after each fed token. The next step walks the window slot by slot
through the one state machine (``state_machine``): slot j chooses its token as the sequential engine would, except
that a code with a draft keeps it with probability min(1, p(d) / q(d)) and otherwise draws from normalise(max(0,
p - q)): the speculative-sampling rule, which leaves every code distributed as p. Slot j + 1 is read only if slot j
chose exactly the token fed after it; its p was conditioned on that token. A row writes between 1 and W tokens a
step; text stays one token per step (no drafts outside image templates).

The drafts are SJD's Jacobi iteration: the draft at a position is drawn from this step's p for that position
(conditioned on the window as fed, rejected drafts included), or from the last slot's p past the window's end. Any
q keeps the output exact; a better q is only accepted more often.

Rejected drafts' keys/values stay in the caches past each row's column: the next window overwrites them, and the
masks (``kv_cache.DecodeCaches.begin_window``) never show a query a column past its own. The caches are
``jacobi_window - 1`` columns longer than sequential decoding's.
"""

from __future__ import annotations

import torch

from vlcot_grpo.attention import round_up
from vlcot_grpo.fast_rollout import RECORDS, ROW_STATE, StaticDecoder
from vlcot_grpo.models import CODE
from vlcot_grpo.sampling import exponential_race, log_prob_of, step_scores
from vlcot_grpo.state_machine import ChainLayout, RowState, StepTokens, advance, choose_tokens, guidance_slot

__all__ = ["JacobiDecoder", "accepts", "draft_window", "residual", "verify_codes"]

#: per-row counters of a Jacobi rollout (``JacobiDecoder.decoding_stats``)
COUNTERS = ("live_steps", "image_steps", "image_tokens", "accepted")
#: noise drawn before each step (text, codes, drafts: Exp(1); acceptance: U(0, 1)), in this order
NOISE = ("text_noise", "code_noise", "draft_noise", "accept_noise")


def accepts(p_draft: torch.Tensor, q_draft: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Whether each draft is kept: with probability min(1, p(d) / q(d)), ``uniform`` ~ U(0, 1)."""
    return uniform * q_draft < p_draft


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejected draft is replaced from: max(0, p - q) (unnormalised; the race normalises)."""
    left = (p - q).clamp_min(0)
    # rejected with p == q up to rounding: no residual mass, and p is what is left
    return torch.where(left.sum(-1, keepdim=True) > 0, left, p)


def verify_codes(codes, q, fed, has_draft, code_noise, accept_noise, *, do_sample: bool):
    """Each window slot's code, under the speculative-sampling rule. ``codes`` (R, W, V): the target scores of
    every slot (softmax them); slot j's draft is ``fed[:, j + 1]``, drawn from ``q[:, j]``, where ``has_draft[:, j +
    1]`` (``has_draft`` is indexed as ``fed``).
    Returns (codes (R, W), their log-probs under p, p (R, W, V)).

    With a draft d: keep it if u q(d) < p(d) (probability min(1, p(d) / q(d))), else draw from normalise(max(0,
    p - q)). Without one: draw from p. Greedy: the argmax of p, kept as a draft only where equal to it."""
    p = torch.softmax(codes, -1)
    if not do_sample:
        token = codes.argmax(-1)
        return token, torch.zeros(token.shape, dtype=torch.float32, device=token.device), p
    draft = torch.cat([fed[:, 1:], fed[:, :1]], 1)  # the last slot has no draft: any in-range id
    has_draft = torch.cat([has_draft[:, 1:], torch.zeros_like(has_draft[:, :1])], 1)
    p_d = p.gather(-1, draft[..., None]).squeeze(-1)
    q_d = q.gather(-1, draft[..., None]).squeeze(-1)
    accept = accepts(p_d, q_d, accept_noise)
    rejected = exponential_race(residual(p, q), code_noise)
    fresh = exponential_race(p, code_noise)
    token = torch.where(has_draft, torch.where(accept, draft, rejected), fresh)
    return token, log_prob_of(codes.flatten(0, 1), token.flatten()).view(token.shape), p


def draft_window(row: RowState, layout: ChainLayout, p, written, pending, live, noise, *, do_sample: bool, pad_id):
    """The next window per row: (tokens (R, W), which of them are drafts (R, W), q (R, W - 1, V)). Slot 0 is the
    ``pending`` token; slot i > 0 the draft of template position ``tpos + i - 1`` of the row's image, where the row
    is ``live`` inside an image past its start token and the template reaches that far: its forced token, or a code
    drawn from q = this step's p at the slot that predicted that position (``written`` tokens this step: slot
    written - 1 + i), the last slot's past the window. ``q[:, i - 1]`` is the draft of slot i."""
    rows, window, vocab = p.shape
    offsets = torch.arange(1, window, device=p.device)
    position = row.tpos[:, None] + offsets - 1
    stage = row.stage.clamp(min=0)
    valid = live[:, None] & (position < layout.template_len[stage][:, None])
    forced = layout.templates[stage[:, None], position.clamp(max=layout.templates.shape[1] - 1)]
    source = (written[:, None] - 1 + offsets).clamp(0, window - 1)
    q = p.gather(1, source[..., None].expand(rows, window - 1, vocab))
    code = exponential_race(q, noise[:, 1:]) if do_sample else q.argmax(-1)
    drafts = torch.where(valid, torch.where(forced == CODE, code, forced), torch.full_like(code, pad_id))
    tokens = torch.cat([pending[:, None], drafts], 1)
    return tokens, torch.cat([torch.zeros_like(valid[:, :1]), valid], 1), q


class JacobiDecoder(StaticDecoder):
    """The static engine's ``generate`` call with speculative Jacobi decoding of image codes (module doc). Same
    setup, loop and collect as ``StaticDecoder``; its step feeds a window per row."""

    def __init__(self, engine, device):
        super().__init__(engine, device)
        self.window = self.config.jacobi_window
        self.sync_column = 0  # the longest row's column at the last host check: the read bound grows from it
        self.decoding_stats: dict[str, float] = {}

    # ----- setup ---------------------------------------------------------------------------------------------------
    def _initial_state(self, prompt_ids, num_generations, positions, logits) -> dict[str, torch.Tensor]:
        s = super()._initial_state(prompt_ids, num_generations, positions, logits)
        rows, vocab, w, device = s["logits"].shape[0], s["logits"].shape[1], self.window, self.device
        steps = max(self.config.max_new_tokens, 0) + 1  # one column more: inactive slots write there

        def full(shape, value, dtype):
            return torch.full(shape, value, dtype=dtype, device=device)

        window_logits = full((rows, w, vocab), 0.0, torch.float32)
        window_logits[:, 0] = s["logits"]  # the prefill's prediction; no drafts yet
        s.update(
            logits=window_logits,
            uncond_logits=torch.zeros_like(window_logits),
            text_noise=full((rows, w, vocab), 1.0, torch.float32),
            code_noise=full((rows, w, vocab), 1.0, torch.float32),
            draft_noise=full((rows, w, vocab), 1.0, torch.float32),
            accept_noise=full((rows, w), 0.5, torch.float32),
            q=full((rows, w, vocab), 0.0, torch.float32),
            fed=full((rows, w), self.layout.pad_id, torch.long),
            has_draft=full((rows, w), False, torch.bool),
            # the column of the last window's first token: the prompt's last one before any step
            column=full((rows,), self.first_column - 1, torch.long),
            tokens=full((rows, steps), self.layout.pad_id, torch.long),
            sampled=full((rows, steps), False, torch.bool),
            logprobs=full((rows, steps), 0.0, torch.float32),
            top_k=full((rows, steps), 0, torch.long),
            **{name: full((rows,), 0, torch.long) for name in COUNTERS},
        )
        self.sync_column = self.first_column - 1
        return s

    def read_bucket(self, steps: int) -> int:
        """Row-cache columns read ``steps`` steps after the last host check: a row's column grows by at most a
        window a step, and its window reaches a window further."""
        return round_up(self.sync_column + (steps + 2) * self.window, self.config.kv_bucket, self.caches.row.length)

    def guide_bucket(self, live: int) -> int:
        if not self.guided:
            return 0
        bound = live + (self.config.sync_every + 1) * self.window
        return round_up(bound, self.config.kv_bucket, self.caches.guide.length)

    # ----- the loop ------------------------------------------------------------------------------------------------
    def _decode(self, generator) -> int:
        cfg, s = self.config, self.state
        steps = since_sync = guide_len = 0
        while steps < cfg.max_new_tokens:  # every step writes a token per live row: a bound, rarely reached
            if steps % cfg.sync_every == 0:
                stop = s["done"] | (s["lengths"] >= cfg.max_new_tokens)
                stop, column, live = torch.stack(
                    [stop.all().long(), s["column"].max(), s["guide_slot"].max()]
                ).tolist()
                if stop:
                    break
                self.sync_column, since_sync, guide_len = column, 0, self.guide_bucket(live)
            key = (self.read_bucket(since_sync), guide_len)
            if cfg.do_sample:
                for name in NOISE[:3]:
                    s[name].exponential_(generator=generator)
                s["accept_noise"].uniform_(generator=generator)
            self.advance(key)
            steps += 1
            since_sync += 1
        return steps

    def collect(self, prompt_ids, num_generations: int, steps: int):
        s = self.state
        limit = max(self.config.max_new_tokens, 0)
        written = StepTokens(*(s[name][:, :limit] for name in RECORDS))
        counts = {name: int(s[name].sum()) for name in COUNTERS}
        self.decoding_stats = {
            "forward_passes_per_image_token": counts["image_steps"] / max(counts["image_tokens"], 1),
            "accepted_drafts_per_step": counts["accepted"] / max(counts["live_steps"], 1),
            "image_tokens": float(counts["image_tokens"]),
            "image_forward_passes": float(counts["image_steps"]),
            "accepted_drafts": float(counts["accepted"]),
            "row_steps": float(counts["live_steps"]),
            "decode_steps": float(steps),
        }
        batch = self.engine.collect(prompt_ids, num_generations, written, s["done"], s["lengths"])
        batch.decoding = dict(self.decoding_stats)
        return batch

    # ----- one step (fixed shapes, in-place writes, no host reads) ----------------------------------------------
    def step(self, read_len: int, guide_read_len: int) -> None:
        """Verify the last window, advance the rows through the tokens they keep, feed the next window."""
        s, cfg, w = self.state, self.config, self.window
        rows = s["logits"].shape[0]
        uncond = s["uncond_logits"].flatten(0, 1) if self.guided else None
        scores = step_scores(s["logits"].flatten(0, 1), uncond, self.text_mask, self.code_mask, self.sampler_settings)
        text, codes, k = (t.view(rows, w, *t.shape[1:]) for t in scores)
        if cfg.do_sample:
            text_token = exponential_race(torch.softmax(text, -1), s["text_noise"])
            text_logprob = log_prob_of(text.flatten(0, 1), text_token.flatten()).view(rows, w)
        else:
            text_token = text.argmax(-1)
            text_logprob = torch.zeros(text_token.shape, dtype=torch.float32, device=text_token.device)
        code, code_logprob, p = verify_codes(
            codes, s["q"], s["fed"], s["has_draft"], s["code_noise"], s["accept_noise"], do_sample=cfg.do_sample
        )
        row, written, pending = self._walk(text_token, text_logprob, code, code_logprob, k)
        for name, value in zip(ROW_STATE, row):
            s[name].copy_(value)
        full = s["lengths"] >= cfg.max_new_tokens
        live = (row.stage >= 0) & (row.tpos > 0) & ~row.done & ~full
        fed, has_draft, q = draft_window(
            row,
            self.layout,
            p,
            written,
            pending,
            live,
            s["draft_noise"],
            do_sample=cfg.do_sample,
            pad_id=self.layout.pad_id,
        )
        s["fed"].copy_(fed)
        s["has_draft"].copy_(has_draft)
        s["q"][:, : w - 1].copy_(q)
        s["column"].add_(written)
        s["positions"].add_(written)
        self._feed_window(row, read_len, guide_read_len)
        s["step"].add_(1)

    def _walk(self, text_token, text_logprob, code, code_logprob, k):
        """The window slot by slot through the state machine: each active slot's token recorded at the row's
        length; the next slot is active while the token equals the one fed after it. Returns (the row state after
        the kept tokens, tokens kept per row, the last one: the next window's first)."""
        s, cfg = self.state, self.config
        row = RowState(*(s[name] for name in ROW_STATE))
        active = ~row.done & (s["lengths"] < cfg.max_new_tokens)
        written = torch.zeros_like(s["lengths"])
        pending = torch.full_like(s["lengths"], self.layout.pad_id)
        wrote_image = torch.zeros_like(active)
        dump = s["tokens"].shape[1] - 1
        for j in range(self.window):  # a fixed, short loop: unrolled when traced
            chosen = choose_tokens(
                row, self.layout, text_token[:, j], text_logprob[:, j], code[:, j], code_logprob[:, j], k[:, j]
            )
            at = torch.where(active, s["lengths"], dump)[:, None]
            for name, value in zip(RECORDS, chosen):
                s[name].scatter_(1, at, value[:, None])
            s["lengths"].add_(active.long())
            s["image_tokens"].add_((active & (row.stage >= 0)).long())
            wrote_image |= active & (row.stage >= 0)
            new = advance(row, self.layout, chosen.token, s["column"] + 1 + j)
            row = RowState(*(torch.where(active, a, b) for a, b in zip(new, row)))
            pending = torch.where(active, chosen.token, pending)
            written = written + active.long()
            if j + 1 < self.window:
                active = (
                    active
                    & ~row.done
                    & (s["lengths"] < cfg.max_new_tokens)
                    & s["has_draft"][:, j + 1]
                    & (chosen.token == s["fed"][:, j + 1])
                )
                s["accepted"].add_(active.long())
        s["live_steps"].add_((written > 0).long())
        s["image_steps"].add_(wrote_image.long())
        return row, written, pending

    def _feed_window(self, row: RowState, read_len: int, guide_read_len: int) -> None:
        """The forward of the next window: conditional rows at their own columns and positions, guidance rows at
        the window's indices in the current image."""
        s, caches, w = self.state, self.caches, self.window
        offsets = torch.arange(w, device=self.device)
        feed, positions, slots = s["fed"], s["positions"][:, None] + offsets, None
        if self.guided:
            slot = guidance_slot(row, s["column"])
            s["guide_slot"].copy_(slot)
            slots = slot[:, None] + offsets
            feed = torch.cat([feed, feed])
            positions = torch.cat([positions, slots])
        caches.begin_window(read_len, s["column"][:, None] + offsets, self.first_column, slots, guide_read_len)
        out = self.model(input_ids=feed, position_ids=positions, cache=caches, use_cache=True, vlcot_kv=caches)
        s["logits"].copy_(out.logits[: caches.rows])
        if self.guided:
            s["uncond_logits"].copy_(out.logits[caches.rows :])

    def _snapshot(self):
        keep = RECORDS + NOISE  # written before being read
        return {name: t.clone() for name, t in self.state.items() if name not in keep}, self.caches.column.clone()
