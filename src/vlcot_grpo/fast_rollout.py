"""The static rollout engine: the GPU path of ``RolloutEngine`` (``RolloutConfig.engine = "static"``, or ``"auto"`` on
CUDA). Same interface, same state machine (``vlcot_grpo.state_machine``), same tokens as the reference path under
greedy decoding, and the same per-position distribution when sampling (``tests/test_fast_rollout.py``).

A rollout is ``StaticDecoder.run``: ``prepare`` (prefill, then static caches and state buffers), the decode loop,
``collect``. Its pieces, each in its own module:

* ``kv_cache``: the row, guidance and shared-prompt caches, and the step's view of them.
* ``attention``: the attention function transformers calls during a decode step, and its kernels.
* ``state_machine``: what each row writes and where it goes next.
* ``cuda_graphs``: the decode step captured once per (row bucket, guidance bucket) and replayed.
* ``fusion``: compiled decoder layers (``compile_step``) and fused projections (``fuse_projections``).

One decode step (``StaticDecoder.step``) is one fixed-shape tensor program: the text and code candidates of every row
(``vlcot_grpo.sampling``, as the reference path computes them), drawn by the exponential race ``argmax(p / E)``,
``E ~ Exp(1)``, which samples from ``p`` exactly and is what ``torch.multinomial`` computes for one sample (without
its validity check, a device read per token); then the state machine, the forward, the cache writes. The noise is
drawn from the caller's generator into two static buffers (text, then codes, as the reference path draws) before
each step, outside any graph, so a seeded run repeats the reference path's samples up to float rounding of the
logits, which differs between the attention paths and can flip a near-tie. The host reads the device every
``sync_every`` steps only ("every row done?" and the longest live image, in one transfer); steps after the last row
finished only add padding, which ``collect`` trims.

Reads are bucketed: the row cache in multiples of ``kv_bucket`` columns from the step count (the host picks the
bucket, and its graph, without a sync), the guidance cache from the longest live image at the last host check plus
``sync_every``. Graphs live for one ``generate`` call, so the KV memory is released before training resumes. On the
CPU the same step runs eagerly; its capture-readiness is checked by tracing it with ``torch.compile(fullgraph=True)``.

``compile_step`` compiles each decoder layer (one code for all layers) and the sampling function, with dynamic
shapes, once per process; the first step of a call compiles or checks guards (``compile_seconds``) before any capture.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext

import torch

from vlcot_grpo.attention import (
    ATTENTION_NAME,
    OPAQUE_ATTENTION_NAME,
    attention_implementation,
    compute_units,
    prompt_pieces,
    round_up,
)
from vlcot_grpo.cuda_graphs import GraphRunner, rolled_back
from vlcot_grpo.fusion import compiled_layers, fused_projections
from vlcot_grpo.kv_cache import build_decode_caches
from vlcot_grpo.sampling import exponential_race, log_prob_of, sampler_settings, step_scores
from vlcot_grpo.state_machine import RowState, StepTokens, advance, choose_tokens, guidance_slot

__all__ = [
    "RECORDS",
    "ROW_STATE",
    "CompileStepError",
    "StaticDecoder",
    "error_summary",
    "generate_static",
    "sample_tokens",
]

logger = logging.getLogger(__name__)

#: the state machine's buffers, in ``RowState`` order
ROW_STATE = ("stage", "tpos", "done", "restart")
#: the per-step records, in ``StepTokens`` order
RECORDS = ("tokens", "sampled", "logprobs", "top_k")


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
    token = exponential_race(torch.softmax(scores, -1), noise)
    return token, log_prob_of(scores, token)


_compiled_sample_tokens = torch.compile(sample_tokens, dynamic=True)


def error_summary(err: Exception) -> str:
    """ "Type: first line of the message", for a warning or an error that wraps ``err``."""
    message = str(err)
    return f"{type(err).__name__}: {message.splitlines()[0] if message else ''}"


class CompileStepError(RuntimeError):
    """The first compiled decode step failed (``compile_step``): inductor cannot build its kernels here."""


def generate_static(engine, device, prompt_ids, num_generations, generator):
    """``RolloutEngine.generate`` on the static engine. ``compile_step`` left unset is a best effort: if compiling
    fails, a warning says why and the rollout runs uncompiled, from the same generator state (the failed attempt drew
    nothing); set, the failure is raised."""
    kind = StaticDecoder
    if engine.config.image_decoding == "jacobi":
        from vlcot_grpo.jacobi import JacobiDecoder as kind
    decoder = kind(engine, device)
    try:
        return decoder.run(prompt_ids, num_generations, generator)
    except CompileStepError as err:
        if engine.config.compile_step is not None:  # asked for explicitly: the caller hears of it
            raise
        engine.compile_failure = str(err)  # not the error itself: its frames hold the caches
    decoder.release()  # the failed decoder's buffers go before the next one allocates its own
    del decoder
    logger.warning(
        "%s. compile_step was left unset: the decode steps run uncompiled from now on", engine.compile_failure
    )
    return kind(engine, device).run(prompt_ids, num_generations, generator)


class StaticDecoder:
    """One ``generate`` call of the static engine: ``prepare`` → decode steps → ``collect``, holding the caches,
    state buffers and graphs of that call until ``release``.

    For benchmarks and tests: ``prepare``, then ``step`` (one decode step at the given read lengths, inside
    ``decoding()``), ``read_bucket`` / ``guide_bucket`` (the read lengths ``run`` would pick), ``release``."""

    def __init__(self, engine, device):
        self.engine = engine
        self.model = engine.model
        self.config = engine.config
        self.device = torch.device(device)
        self.layout = engine.layout.to(self.device)  # read by the step; the host reads ``engine.layout``
        self.text_mask = engine.text_mask.to(self.device)
        self.code_mask = engine.code_mask.to(self.device)
        self.guided = self.config.guidance_scale != 1.0
        self.units = compute_units(self.device)  # the "split" attention kernel sizes its pieces by it
        # after a failed compile (RolloutEngine.compile_failure) the engine's later calls run uncompiled
        self.compile = self.config.resolved_compile(self.device) and engine.compile_failure is None
        # likewise after the fused weights did not fit where fuse_projections was left unset
        self.fuse = self.config.resolved_fuse(self.device) and engine.fuse_failure is None
        self.sample = _compiled_sample_tokens if self.compile else sample_tokens
        self.sampler_settings = sampler_settings(self.config)
        self.graphs = None
        if self.config.uses_cuda_graphs(self.device):
            self.graphs = GraphRunner(self.step, self._snapshot, self._restore, self.device)
        self.window = 1  # tokens fed per row and step (``jacobi.JacobiDecoder``: more)
        self.shared = False  # share_prompt_cache, decided in prepare (it needs num_generations > 1)
        self.pieces: tuple[int, int] | None = None  # the shared prompt cache's (pieces, piece)
        self.caches = None
        self.state: dict[str, torch.Tensor] | None = None
        #: (row bucket, guidance bucket) of every decode step run, for benchmarks and tests
        self.buckets_used: list[tuple[int, int]] = []
        self.prefill_seconds = 0.0
        self.compile_seconds = 0.0  # compile_step: the first (rolled-back) step, which compiles or loads the code

    @property
    def capture_seconds(self) -> float:
        return self.graphs.capture_seconds if self.graphs else 0.0

    @property
    def graphs_captured(self) -> int:
        return self.graphs.captured if self.graphs else 0

    # ----- the call ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, prompt_ids, num_generations: int = 1, generator: torch.Generator | None = None):
        start = time.perf_counter()
        self.prepare(prompt_ids, num_generations)
        if self.device.type == "cuda":  # once per call, so that the timings below mean something
            torch.cuda.synchronize(self.device)
        self.prefill_seconds = time.perf_counter() - start
        steps = 0
        if self.config.max_new_tokens > 0:
            with self.decoding():
                if self.compile:  # compile outside the timed steps and before any capture
                    self._compile_first_step()
                steps = self._decode(generator)
        batch = self.collect(prompt_ids, num_generations, steps)
        self.release()
        return batch

    def _compile_first_step(self) -> None:
        start = time.perf_counter()
        try:
            self.warm_up((self.read_bucket(0), self.guide_bucket(0)))
        except torch._dynamo.exc.TorchDynamoException as err:  # compiling; other errors are not its
            raise CompileStepError(
                "compile_step (rollout_compile / upscale --compile): the first compiled decode step failed "
                f"({error_summary(err)}); the rollout runs without it when the option is off"
            ) from err
        self.compile_seconds = time.perf_counter() - start

    def _decode(self, generator) -> int:
        """The decode steps until every row is done or the length limit; returns how many ran."""
        cfg, s = self.config, self.state
        steps = guide_len = 0
        while steps < cfg.max_new_tokens:
            if steps % cfg.sync_every == 0:
                all_done, live = torch.stack([s["done"].all().long(), s["guide_slot"].max()]).tolist()
                if all_done:
                    break
                guide_len = self.guide_bucket(live)
            key = (self.read_bucket(steps), guide_len)
            if cfg.do_sample:  # text first, then codes: the order in which the reference path draws
                s["text_noise"].exponential_(generator=generator)
                s["code_noise"].exponential_(generator=generator)
            self.advance(key)
            steps += 1
        return steps

    def advance(self, key: tuple[int, int]) -> None:
        """One decode step at bucket ``key`` (read length, guidance read length): its captured graph replayed, or
        the step run."""
        if self.graphs is not None:
            self.graphs.replay(key)
        else:
            self.step(*key)
        self.buckets_used.append(key)

    def collect(self, prompt_ids, num_generations: int, steps: int):
        """The ``RolloutBatch`` of the first ``steps`` decode steps."""
        s = self.state
        written = StepTokens(*(s[name][:, :steps] for name in RECORDS))
        return self.engine.collect(prompt_ids, num_generations, written, s["done"], s["lengths"])

    def release(self) -> None:
        """Drop the caches, state and graphs of this call."""
        if self.graphs is not None:
            self.graphs.release()
        self.caches = None
        self.state = None

    @contextmanager
    def decoding(self):
        """The model as the decode steps need it: the split attention and, with ``compile_step``, compiled layers."""
        name = OPAQUE_ATTENTION_NAME if self.compile else ATTENTION_NAME
        # left unset, fusing is a best effort: without room for the copy the rollout runs unfused
        on_out_of_memory = self._fusing_failed if self.config.fuse_projections is None else None
        fused = fused_projections(self.model, on_out_of_memory) if self.fuse else nullcontext()
        compiled = compiled_layers(self.model) if self.compile else nullcontext()
        with attention_implementation(self.model, name), fused, compiled:
            yield

    def _fusing_failed(self, err: Exception) -> None:
        self.engine.fuse_failure = error_summary(err)
        logger.warning(
            "fuse_projections was left unset and the fused copy of the q/k/v and gate/up weights does not fit (%s): "
            "the decode steps run them unfused from now on",
            self.engine.fuse_failure,
        )

    # ----- setup -----------------------------------------------------------------------------------------------
    def prepare(self, prompt_ids, num_generations: int) -> None:
        """Prefill the prompts, then allocate the static caches and the state buffers of the decode steps."""
        cfg = self.config
        cache, attn, positions, logits = self.engine.prefill_prompts(prompt_ids, self.device)
        n_prompts, width = attn.shape
        self.shared = cfg.shares_prompt_cache(num_generations)
        # The row caches' first written column: after the prompt, or 0 when they hold only generated tokens.
        self.first_column = 0 if self.shared else width
        if self.shared:
            self.pieces = prompt_pieces(n_prompts * cache.layers[0].keys.shape[1], width, self.units)
        self.caches = build_decode_caches(
            cache,
            attn,
            generations=num_generations,
            # whole buckets: every read is then a multiple of kv_bucket (aligned for the kernels); a window's last
            # step may write window - 1 columns past the length limit
            length=round_up(self.first_column + cfg.max_new_tokens + self.window - 1, cfg.kv_bucket),
            guide_length=round_up(int(self.engine.layout.template_len.max()) + self.window - 1, cfg.kv_bucket),
            shared_pieces=self.pieces if self.shared else None,
            kernel=cfg.decode_attention,
            units=self.units,
            compiled=self.compile,
            guided=self.guided,
        )
        del cache
        self.state = self._initial_state(prompt_ids, num_generations, positions, logits)

    def _initial_state(self, prompt_ids, num_generations, positions, logits) -> dict[str, torch.Tensor]:
        """Everything a step reads or writes, as fixed buffers: graphs replay on their addresses."""
        rows, vocab, device = logits.shape[0] * num_generations, logits.shape[-1], self.device
        steps = max(self.config.max_new_tokens, 0)

        def full(shape, value, dtype):
            return torch.full(shape, value, dtype=dtype, device=device)

        return {
            "stage": self.engine.layout.initial_stage(prompt_ids, num_generations).to(device),
            "tpos": full((rows,), 0, torch.long),
            "done": full((rows,), False, torch.bool),
            "restart": full((rows,), self.first_column, torch.long),
            "positions": positions[:, -1].repeat_interleave(num_generations, 0).clone(),
            "step": full((1,), 0, torch.long),
            # cloned: a view of the prefill logits would make torch.compile guard on their base's sizes
            "logits": logits.float().repeat_interleave(num_generations, 0).clone(),
            "uncond_logits": full((rows, vocab), 0.0, torch.float32),
            "guide_slot": full((rows,), 0, torch.long),
            "text_noise": full((rows, vocab), 1.0, torch.float32),
            "code_noise": full((rows, vocab), 1.0, torch.float32),
            "tokens": full((rows, steps), self.layout.pad_id, torch.long),
            "sampled": full((rows, steps), False, torch.bool),
            "logprobs": full((rows, steps), 0.0, torch.float32),
            "top_k": full((rows, steps), 0, torch.long),
            "lengths": full((rows,), 0, torch.long),
        }

    def read_bucket(self, steps: int) -> int:
        """Row-cache columns read by the decode step after ``steps`` steps: the written ones, in whole buckets."""
        return round_up(self.first_column + steps + 1, self.config.kv_bucket, self.caches.row.length)

    def guide_bucket(self, live: int) -> int:
        """Guidance slots read until the next host check, ``live`` the longest live image now (0 without guidance):
        slots grow by at most one a step, so the next ``sync_every`` steps stay within live + sync_every + 1."""
        if not self.guided:
            return 0
        return round_up(live + self.config.sync_every + 1, self.config.kv_bucket, self.caches.guide.length)

    # ----- one decode step (graph-capturable: fixed shapes, in-place writes, no host reads) ----------------------
    def step(self, read_len: int, guide_read_len: int) -> None:
        """One decode step: sample, record, advance the state machine, feed the tokens. ``read_len`` row-cache
        columns and ``guide_read_len`` guidance slots are read (``read_bucket``, ``guide_bucket``)."""
        s = self.state
        row = RowState(*(s[name] for name in ROW_STATE))
        candidates = self.sample(
            s["logits"],
            s["uncond_logits"] if self.guided else None,
            self.text_mask,
            self.code_mask,
            s["text_noise"],
            s["code_noise"],
            do_sample=self.config.do_sample,
            settings=self.sampler_settings,
        )
        chosen = choose_tokens(row, self.layout, *candidates)
        for name, value in zip(RECORDS, chosen):
            s[name].index_copy_(1, s["step"], value[:, None])
        s["lengths"].add_((~row.done).long())
        new = advance(row, self.layout, chosen.token, self.caches.column)
        for name, value in zip(ROW_STATE, new):
            s[name].copy_(value)
        self._feed(chosen.token, new, read_len, guide_read_len)
        s["step"].add_(1)
        self.caches.column.add_(1)

    def _feed(self, token, row: RowState, read_len: int, guide_read_len: int) -> None:
        """The forward of the written tokens: conditional rows continue, guidance rows write at the token's index in
        the current image (``guidance_slot``). Their logits go to the state buffers."""
        s, caches = self.state, self.caches
        s["positions"].add_(1)
        feed, positions, slot = token, s["positions"], None
        if self.guided:
            slot = guidance_slot(row, caches.column)
            s["guide_slot"].copy_(slot)
            feed = torch.cat([token, token])
            positions = torch.cat([positions, slot])
        caches.begin_step(read_len, slot, guide_read_len)
        out = self.model(
            input_ids=feed[:, None], position_ids=positions[:, None], cache=caches, use_cache=True, vlcot_kv=caches
        )
        logits = out.logits[:, -1]
        s["logits"].copy_(logits[: caches.rows])
        if self.guided:
            s["uncond_logits"].copy_(logits[caches.rows :])

    def warm_up(self, key: tuple[int, int]) -> None:
        """A decode step at read lengths ``key``, then undone (what precedes each CUDA-graph capture): its cache writes
        land where the next real step writes before anything reads them."""
        rolled_back(self.step, self._snapshot, self._restore, key)

    def _snapshot(self):
        keep = RECORDS + ("text_noise", "code_noise")  # written before being read
        return {name: t.clone() for name, t in self.state.items() if name not in keep}, self.caches.column.clone()

    def _restore(self, saved) -> None:
        state, column = saved
        for name, t in state.items():
            self.state[name].copy_(t)
        self.caches.column.copy_(column)
