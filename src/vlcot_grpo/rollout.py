"""The VLCoT rollout engine: free text, then images whose layout the engine forces, in one token sequence.

Per row, a small state machine runs on tensors:

* text mode: sample from the text vocabulary (no image codes, no layout tokens). Writing an image-opening tag
  (``<rough_image>``, ...) switches the row to image mode for that stage; EOS or ``</final_image>`` ends it.
* image mode: walk the stage's template (``backend.image_template`` + the closing tag): forced positions are written
  as they are; code positions are sampled from the image codes only, optionally with classifier-free guidance.

Guidance follows ``transformers``' convention (``guidance_scale`` 1.0 = off): guided = u + s (c - u) on log-softmaxed
scores, where the unconditional branch sees only the current image's tokens, starting at its image-start token. Those
unconditional rows run in the *same* forward pass as the conditional rows: they share the KV cache tensor, and at
each image start the row is "restarted" by masking out everything before it (attention mask + position ids), so no
second sequential pass and no cache copy is needed.

This module is the *reference* path: a ``DynamicCache`` grown by concatenation, one Python-driven step at a time.
``vlcot_grpo.fast_rollout`` is the GPU path (static caches, a separate small guidance cache, sampling and the state
machine as in-place tensor ops, CUDA graphs): same interface, same tokens under greedy decoding, same distribution
when sampling. ``RolloutConfig.engine`` picks one; ``"auto"`` takes the static path on CUDA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from vlcot_grpo.models import ImageTokenBackend
from vlcot_grpo.sampling import log_prob_of, sampler_settings, step_scores
from vlcot_grpo.state_machine import ChainLayout, RowState, StepTokens, advance, choose_tokens
from vlcot_grpo.vlcot import STAGES

logger = logging.getLogger(__name__)

#: The rollout engines (``RolloutConfig.engine``); "auto" is the static one on CUDA and the reference one elsewhere.
ENGINES = ("auto", "reference", "static")
DECODE_ATTENTION = ("sdpa", "split")
#: How image codes are decoded (``RolloutConfig.image_decoding``); text is always one token per step.
IMAGE_DECODING = ("sequential", "jacobi")
# measured slower than sdpa and removed (docs/benchmarks.md, "Two kernels removed"): named in the error for old configs
REMOVED_ATTENTION = ("varlen", "matmul")


@dataclass
class RolloutConfig:
    """How rollouts are sampled. Sizes are in pixels; each must be a multiple of the model's downsample factor."""

    stage_sizes: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"rough": (128, 128), "middle": (256, 256), "final": (512, 512)},
        metadata={"help": "Image size (height, width) of each stage: rough, middle, final."},
    )
    max_new_tokens: int = field(default=7000, metadata={"help": "Length limit of a completion, in tokens."})
    do_sample: bool = field(default=True, metadata={"help": "Sample (True) or take the argmax (False)."})
    text_temperature: float = field(default=0.9, metadata={"help": "Temperature of text tokens."})
    text_top_k: int = field(
        default=0, metadata={"help": "Top-k of text tokens (0 = off, 1 = greedy text, as the paper's RL rollouts)."}
    )
    text_top_p: float = field(default=1.0, metadata={"help": "Nucleus top-p of text tokens (1.0 = off)."})
    text_min_p: float = field(
        default=0.0, metadata={"help": "Min-p of text tokens: drop those below min_p times the best one (0 = off)."}
    )
    image_temperature: float = field(default=0.9, metadata={"help": "Temperature of image codes."})
    image_top_k: int = field(
        default=0,
        metadata={
            "help": "Top-k of image codes: 0 = off, > 0 fixed, -1 = the paper's entropy-dependent k = round(1 + "
            "1999 sigmoid(H - 5)), H the entropy (nats) of the guided code distribution before temperature, "
            "clipped to [0, 10]. Order: guidance, entropy, top-k, temperature (vlcot_grpo.sampling)."
        },
    )
    guidance_scale: float = field(
        default=1.0,
        metadata={
            "help": "Classifier-free guidance on image codes, transformers' convention: u + s (c - u) on "
            "log-probs, 1.0 = off; the unconditional branch sees only the current image (the paper's 0.8 is 0.8)."
        },
    )
    engine: str = field(
        default="auto",
        metadata={
            "help": "'auto' (static on CUDA or for image_decoding 'jacobi', unless the weights are quantized; "
            "reference elsewhere), 'static' "
            "(vlcot_grpo.fast_rollout: static caches, CUDA graphs on CUDA) or 'reference' (DynamicCache, eager). "
            "Same tokens under greedy decoding; speeds in docs/benchmarks.md.",
            "choices": list(ENGINES),
        },
    )
    sync_every: int = field(
        default=32,
        metadata={"help": "Static engine: decode steps between host checks for 'every row is done'."},
    )
    kv_bucket: int = field(
        default=512,
        metadata={
            "help": "Static engine: attention reads the KV caches in multiples of this many positions (one CUDA "
            "graph per bucket pair): smaller wastes less bandwidth on unused positions, larger captures fewer graphs."
        },
    )
    cuda_graphs: bool = field(
        default=True, metadata={"help": "Static engine on CUDA: replay the decode step as captured CUDA graphs."}
    )
    compile_step: bool | None = field(
        default=None,
        metadata={
            "help": "Static engine: fuse the small kernels of the decode steps (norms, rotary, activations, sampling) "
            "with torch.compile (each decoder layer, one code for all layers) before capturing them. Compiles once "
            "per process, at the first rollout (share_prompt_cache and fuse_projections compile code of their "
            "own). Unset: on with CUDA graphs, off elsewhere (without graphs it is slower than eager). If compiling "
            "fails where it was left unset, a warning says why and the decode steps run uncompiled; set to true, "
            "the failure is an error.",
        },
    )
    fuse_projections: bool | None = field(
        default=None,
        metadata={
            "help": "Static engine: during the decode steps, run q/k/v and gate/up as one matrix product each over "
            "a temporary copy of their concatenated weights (the size of those projections' weights). Fewer, wider "
            "products for the few rows of a decode step. Unset: on with CUDA graphs, off elsewhere, and off from "
            "the first rollout where the copy does not fit (a warning says so); set false where that memory is "
            "needed, true to make a failed copy an error."
        },
    )
    decode_attention: str = field(
        default="sdpa",
        metadata={
            "help": "Static engine: attention kernel of a decode step, 'sdpa' (torch's fused kernel), 'split' (that "
            "kernel on pieces of the cache merged afterwards, flash-decoding style: more thread blocks for few "
            "rows): same result; which is faster depends on the GPU and shape (docs/benchmarks.md).",
            "choices": list(DECODE_ATTENTION),
        },
    )

    share_prompt_cache: bool | None = field(
        default=None,
        metadata={
            "help": "Static engine, decode_attention 'sdpa': keep each prompt's keys/values once (not once per "
            "generation) and let its num_generations rows read them together in one attention call, merged with "
            "each row's own tokens by log-sum-exp. Reads the prompt once per step instead of num_generations times, "
            "and holds its cache once. Unset: on wherever it applies (decode_attention 'sdpa', kv_bucket a multiple "
            "of 16, more than one generation)."
        },
    )

    image_decoding: str = field(
        default="sequential",
        metadata={
            "help": "How the static engine decodes image codes: 'sequential' (one token per forward pass) or 'jacobi' "
            "(exact speculative Jacobi decoding, arXiv 2410.01699: each forward pass verifies a window of draft "
            "codes with the speculative-sampling rule, so codes keep the sequential sampler's distribution and "
            "greedy decoding its tokens; forced layout tokens are placed, never drafted). Runs on the static engine "
            "(engine 'auto' then picks it) with decode_attention 'sdpa'; the reference engine is always sequential.",
            "choices": list(IMAGE_DECODING),
        },
    )
    jacobi_window: int = field(
        default=16,
        metadata={
            "help": "image_decoding 'jacobi': tokens fed per row and forward pass (the pending token and "
            "jacobi_window - 1 drafts), so at most this many tokens are accepted per pass."
        },
    )

    def __post_init__(self):
        self._check_image_decoding()
        if self.share_prompt_cache and self.decode_attention != "sdpa":
            raise ValueError(
                f"share_prompt_cache works with decode_attention='sdpa' only, got {self.decode_attention!r}"
            )
        if self.share_prompt_cache and self.kv_bucket % 16:  # fp32 attention on CUDA wants 16-aligned mask rows
            raise ValueError(f"share_prompt_cache needs kv_bucket to be a multiple of 16, got {self.kv_bucket}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.decode_attention not in DECODE_ATTENTION:
            removed = self.decode_attention in REMOVED_ATTENTION
            why = (
                f" ({self.decode_attention!r} was removed: slower than 'sdpa', docs/benchmarks.md)" if removed else ""
            )
            raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {self.decode_attention!r}{why}")
        if self.sync_every < 1 or self.kv_bucket < 1:
            raise ValueError("sync_every and kv_bucket must be at least 1")
        if self.text_top_k < 0 or self.image_top_k < -1:
            raise ValueError(
                f"text_top_k must be >= 0 and image_top_k >= -1, got {self.text_top_k} and {self.image_top_k}"
            )
        if not 0.0 < self.text_top_p <= 1.0 or not 0.0 <= self.text_min_p < 1.0:
            raise ValueError(
                f"text_top_p must be in (0, 1] and text_min_p in [0, 1), got {self.text_top_p}, {self.text_min_p}"
            )
        if self.text_temperature <= 0 or self.image_temperature <= 0:
            raise ValueError(
                f"temperatures must be positive (do_sample=False is greedy), got text {self.text_temperature}, "
                f"image {self.image_temperature}"
            )

    def _check_image_decoding(self) -> None:
        if self.image_decoding not in IMAGE_DECODING:
            raise ValueError(f"image_decoding must be one of {IMAGE_DECODING}, got {self.image_decoding!r}")
        if self.image_decoding != "jacobi":
            return
        if self.jacobi_window < 2:
            raise ValueError(f"jacobi_window must be at least 2 (1 is sequential decoding), got {self.jacobi_window}")
        if self.engine == "reference":
            raise ValueError("image_decoding='jacobi' runs on the static engine; engine='reference' is sequential")
        if self.decode_attention != "sdpa":
            raise ValueError(f"image_decoding='jacobi' needs decode_attention='sdpa', got {self.decode_attention!r}")

    def shares_prompt_cache(self, num_generations: int) -> bool:
        """Whether the static engine keeps one prompt cache per prompt: ``share_prompt_cache`` (unset: wherever the
        kernel and bucket allow it), where there is more than one generation per prompt to share it."""
        if self.share_prompt_cache is None:
            return self.decode_attention == "sdpa" and self.kv_bucket % 16 == 0 and num_generations > 1
        return self.share_prompt_cache and num_generations > 1

    def uses_cuda_graphs(self, device: torch.device) -> bool:
        """Whether the static engine replays its decode steps as CUDA graphs on ``device``; ``compile_step`` and
        ``fuse_projections`` left unset are on exactly there."""
        return torch.device(device).type == "cuda" and self.cuda_graphs

    def resolved_fuse(self, device: torch.device) -> bool:
        """Whether the static engine fuses its projections on ``device``: ``fuse_projections``, unset resolved."""
        return self.uses_cuda_graphs(device) if self.fuse_projections is None else self.fuse_projections

    def resolved_compile(self, device: torch.device) -> bool:
        """Whether the static engine compiles its decode steps on ``device``: ``compile_step``, unset resolved."""
        return self.uses_cuda_graphs(device) if self.compile_step is None else self.compile_step

    def resolved_engine(self, device: torch.device, quantized: bool = False) -> str:
        """The engine that runs on ``device``: ``engine`` with ``"auto"`` resolved. ``quantized``: the model has
        quantized (integer-stored) weights, whose kernels have not been checked inside captured CUDA graphs, so
        ``"auto"`` keeps them on the reference engine (``"static"`` still forces the static one). Jacobi decoding
        exists only on the static engine, so ``"auto"`` picks it for ``image_decoding="jacobi"``."""
        if self.engine == "auto":
            wanted = torch.device(device).type == "cuda" or self.image_decoding == "jacobi"
            return "static" if wanted and not quantized else "reference"
        return self.engine


def has_quantized_weights(model) -> bool:
    """Whether any parameter is stored as integers (bitsandbytes 4/8-bit weights are)."""
    return any(not p.is_floating_point() for p in model.parameters())


@dataclass
class RolloutBatch:
    """Rollouts of a batch. Row ``i`` belongs to prompt ``i // num_generations``."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    #: 1 where the model chose the token (sampled), 0 where the engine forced it (layout, closing tags, EOS).
    sampled_mask: list[list[int]]
    finished: list[bool]
    #: tokens generated per stage block and for text, for logging
    stage_tokens: dict[str, list[int]]
    #: log-prob of each token under the distribution it was drawn from (vlcot_grpo.sampling); 0.0 where forced
    #: and everywhere under greedy decoding
    logprobs: list[list[float]] = field(default_factory=list)
    #: the top-k the sampler kept at each image-code position (0: no top-k, and at every other position)
    top_k: list[list[int]] = field(default_factory=list)
    #: image_decoding "jacobi": forward passes per image token and accepted drafts per step (``JacobiDecoder``)
    decoding: dict[str, float] = field(default_factory=dict)


class RolloutEngine:
    """Generates VLCoT completions with ``model`` (a causal LM taking ``input_ids``/``cache``) and its backend.

    The public pieces the static engine (``vlcot_grpo.fast_rollout``) shares: ``layout`` (the state machine's
    tables), ``prefill_prompts`` and ``collect``."""

    def __init__(self, model, backend: ImageTokenBackend, config: RolloutConfig):
        self.model = model
        self.backend = backend
        self.config = config
        self.layout = ChainLayout.from_backend(backend, config.stage_sizes)
        self.pad_id = self.layout.pad_id
        self.text_mask = backend.text_token_mask.clone()
        self.code_mask = backend.image_code_mask.clone()
        #: why compiling the decode steps failed, once it has: the static engine then runs them uncompiled
        self.compile_failure: str | None = None
        #: why the fused projections did not fit, once they have not: the static engine then runs them unfused
        self.fuse_failure: str | None = None

    # ----- public ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], num_generations: int = 1, generator: torch.Generator | None = None
    ) -> RolloutBatch:
        """Roll out ``num_generations`` completions for each prompt.

        A prompt may end inside the chain, e.g. right after ``<rough_image>``: the engine then starts in image mode.
        """
        device = self.model.device if hasattr(self.model, "device") else next(self.model.parameters()).device
        engine = self.resolved_engine(device)
        if self.config.image_decoding == "jacobi" and engine != "static":
            raise ValueError(
                f"image_decoding='jacobi' runs on the static engine, but engine={self.config.engine!r} resolves to "
                f"{engine!r} on {device}: set engine='static'"
            )
        if engine == "static":
            from vlcot_grpo.fast_rollout import generate_static

            return generate_static(self, device, prompt_ids, num_generations, generator)
        return self._generate_reference(prompt_ids, num_generations, generator, device)

    def resolved_engine(self, device) -> str:
        """The engine ``generate`` runs on ``device`` for this model (``RolloutConfig.resolved_engine``)."""
        return self.config.resolved_engine(device, has_quantized_weights(self.model))

    def image_positions(self, completion_ids: list[int], last_prompt_id: int) -> list[int]:
        """Each completion token's index in the image being written (0 = its image-start token), -1 outside images,
        as the state machine walks them: the position the unconditional branch gives the token. ``last_prompt_id``:
        a prompt that ends with an image-opening tag starts inside that image."""
        return self.layout.image_positions(completion_ids, last_prompt_id)

    def prefill_prompts(self, prompt_ids: list[list[int]], device):
        """One left-padded forward over the distinct prompts: (cache, attention mask, position ids, last logits)."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for i, p in enumerate(prompt_ids):  # left padding: every row's next token sits at the same index
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        ids, attn = ids.to(device), attn.to(device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids, attention_mask=attn, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        )
        return cache, attn, positions, out.logits[:, -1]

    def collect(self, prompt_ids, num_generations, steps: StepTokens, done, lengths) -> RolloutBatch:
        """``steps``: (rows, steps) tensors as generated; row ``i`` is cut after its ``lengths[i]`` written tokens.
        A row that ended by closing the chain in text (``</final_image>`` written as text) gets a forced EOS, so
        that it reads as terminated, not truncated (TRL's ``mask_truncated_completions`` looks for EOS)."""
        tokens, sampled, logprobs, top_k = (t.cpu() for t in steps)
        lengths, finished = lengths.cpu().tolist(), done.cpu().tolist()
        eos_id, final_close_id = self.layout.eos_id, self.layout.final_close_id
        completions, masks, logps, ks = [], [], [], []
        for row, keep in enumerate(lengths):
            ids = tokens[row, :keep].tolist()
            mask = sampled[row, :keep].long().tolist()
            lp = logprobs[row, :keep].tolist()
            k = top_k[row, :keep].tolist()
            if finished[row] and ids and ids[-1] == final_close_id and eos_id >= 0:
                ids, mask, lp, k = ids + [eos_id], mask + [0], lp + [0.0], k + [0]
            completions.append(ids)
            masks.append(mask)
            logps.append(lp)
            ks.append(k)
        initial = self.layout.initial_stage(prompt_ids, num_generations).tolist()
        return RolloutBatch(
            prompt_ids=[p for p in prompt_ids for _ in range(num_generations)],
            completion_ids=completions,
            sampled_mask=masks,
            finished=finished,
            stage_tokens=self._count_stage_tokens(completions, initial),
            logprobs=logps,
            top_k=ks,
        )

    # ----- the reference loop ------------------------------------------------------------------------------------
    def _generate_reference(self, prompt_ids, num_generations, generator, device) -> RolloutBatch:
        cfg = self.config
        layout = self.layout.to(device)
        text_mask, code_mask = self.text_mask.to(device), self.code_mask.to(device)
        settings = sampler_settings(cfg)
        cache, attn, positions, logits = self._prefill(prompt_ids, num_generations, device)
        n_rows, prompt_len = attn.shape
        uncond = None
        if cfg.guidance_scale != 1.0:  # unconditional rows: same cache tensor, no context until their first image
            self._add_unconditional_rows(cache)
            attn = torch.cat([attn, torch.zeros_like(attn)])
            uncond = torch.zeros_like(logits)
        zeros = torch.zeros(n_rows, dtype=torch.long, device=device)
        state = RowState(
            layout.initial_stage(prompt_ids, num_generations).to(device), zeros, zeros.bool(), zeros + prompt_len
        )
        lengths = zeros.clone()  # tokens written before each row ended
        written = []
        for step in range(cfg.max_new_tokens):
            text, codes, k = step_scores(logits, uncond, text_mask, code_mask, settings)
            text_tok, text_lp = self._draw(text, generator)  # text first, then codes: the static engine's order
            code_tok, code_lp = self._draw(codes, generator)
            chosen = choose_tokens(state, layout, text_tok, text_lp, code_tok, code_lp, k)
            written.append(chosen)
            lengths += (~state.done).long()
            state = advance(state, layout, chosen.token, prompt_len + step)
            if bool(state.done.all()):
                break
            positions = positions + 1
            attn = F.pad(attn, (0, 1), value=1)
            logits, uncond = self._feed(chosen.token, positions, attn, cache, state.restart, prompt_len + step, uncond)
        return self.collect(prompt_ids, num_generations, _stacked(written, n_rows), state.done, lengths)

    def _feed(self, token, positions, attn, cache, restart, column, uncond):
        """One forward of the written tokens: conditional rows continue, unconditional rows (when ``uncond`` is
        not None) see only [restart, column]. Returns the next (logits, unconditional logits)."""
        if uncond is None:
            return self._step(token, positions, attn, cache), None
        n_rows = token.shape[0]
        seq_index = torch.arange(attn.shape[1], device=attn.device)
        attn[n_rows:] = (seq_index[None] >= restart[:, None]).to(attn.dtype)
        feed = torch.cat([token, token])
        pos_feed = torch.cat([positions, (column - restart).clamp(min=0)])
        logits = self._step(feed, pos_feed, attn, cache)
        return logits[:n_rows], logits[n_rows:]

    def _prefill(self, prompt_ids, num_generations, device):
        """Run each distinct prompt once, then share its cache across its ``num_generations`` rows."""
        cache, attn, positions, logits = self.prefill_prompts(prompt_ids, device)
        if num_generations > 1:
            cache.batch_repeat_interleave(num_generations)
            logits = logits.repeat_interleave(num_generations, 0)
            attn = attn.repeat_interleave(num_generations, 0)
            positions = positions.repeat_interleave(num_generations, 0)
        return cache, attn, positions[:, -1], logits

    @staticmethod
    def _add_unconditional_rows(cache: DynamicCache) -> None:
        for layer in cache.layers:
            layer.keys = torch.cat([layer.keys, torch.zeros_like(layer.keys)])
            layer.values = torch.cat([layer.values, torch.zeros_like(layer.values)])

    def _step(self, tokens, positions, attn, cache) -> torch.Tensor:
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=attn,
            position_ids=positions[:, None],
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _draw(self, scores, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row from softmax(``scores``) (its argmax without sampling) and its sampling log-prob."""
        if not self.config.do_sample:
            token = scores.argmax(-1)
            return token, torch.zeros(token.shape, dtype=torch.float32, device=token.device)
        token = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(-1)
        return token, log_prob_of(scores, token)

    def _count_stage_tokens(self, completions, initial_stages) -> dict[str, list[int]]:
        """Tokens between each stage's image tags; a row whose prompt ends with an opening tag starts inside it."""
        tags = self.backend.tag_ids
        counts: dict[str, list[int]] = {s: [] for s in STAGES}
        for ids, initial in zip(completions, initial_stages):
            for index, s in enumerate(STAGES):
                o, c = tags[f"<{s}_image>"], tags[f"</{s}_image>"]
                if index == initial:
                    start = -1  # the opening tag is the prompt's last token
                elif o in ids:
                    start = ids.index(o)
                else:
                    counts[s].append(0)
                    continue
                end = ids.index(c, start + 1) if c in ids[start + 1 :] else len(ids)
                counts[s].append(end - start - 1)
        return counts


def _stacked(steps: list[StepTokens], rows: int) -> StepTokens:
    """Per-step records -> (rows, steps) tensors."""
    if not steps:
        dtypes = (torch.long, torch.bool, torch.float32, torch.long)
        return StepTokens(*(torch.zeros(rows, 0, dtype=d) for d in dtypes))
    return StepTokens(*(torch.stack(column, 1) for column in zip(*steps)))
