"""``VLCoTGRPOTrainer``: TRL's ``GRPOTrainer`` with VLCoT rollouts.

It extends rather than forks. What it changes, and why:

* generation goes through TRL's ``rollout_func`` hook to the ``RolloutEngine`` (text + forced-layout images), and
  the engine's "sampled vs forced" mask goes back as ``env_mask`` so forced tokens never enter the loss (nor image
  codes, without ``image_codes_in_loss``);
* rewards get the parsed chain (``vlcot``), its texts and decoded stage images as extra keyword arguments;
* the rollout returns each token's sampling log-prob, and the trained log-probs follow ``sampler_correction``:
  ``guided`` scores the very distribution sampled (an unconditional pass over each image's tokens for guidance,
  the sampled top-k, the text filters), ``importance`` corrects the conditional log-probs by truncated importance
  weights (folded into per-token advantages), ``none`` leaves them uncorrected; the gap between the two log-probs
  is logged every step;
* logging adds the format-valid rate, tokens per stage, rollout vs training time and sample pictures;
* with ``rollout_merge_adapters`` (the default) the LoRA adapters are merged into the base weights for the rollout
  only (``vlcot_grpo.adapters.merged_adapters``), and the exact base weights come back afterwards; quantized bases
  (QLoRA) keep their adapters unmerged.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is TRL's documented hook; we pin TRL

from trl import GRPOTrainer  # noqa: E402
from trl.models import unwrap_model_for_generation  # noqa: E402

from vlcot_grpo.adapters import merged_adapters, quantized_base  # noqa: E402
from vlcot_grpo.card import ModelCardMixin  # noqa: E402
from vlcot_grpo.config import VLCoTGRPOConfig  # noqa: E402
from vlcot_grpo.logprobs import completion_logps, guidance_rows, importance_weights, sampled_logps  # noqa: E402
from vlcot_grpo.models import load_backend, load_checkpoint_weights  # noqa: E402
from vlcot_grpo.rollout import RolloutEngine  # noqa: E402
from vlcot_grpo.sampling import sampler_settings  # noqa: E402
from vlcot_grpo.vlcot import STAGES, encode_prompt, parse_completions  # noqa: E402

logger = logging.getLogger(__name__)


class VLCoTGRPOTrainer(ModelCardMixin, GRPOTrainer):
    """GRPO on VLCoT rollouts. The dataset needs an ``lr_image`` column (PIL) and may have a ``prompt`` column
    (instruction text with the ``<|image|>`` placeholder); every other column reaches the rewards."""

    def __init__(self, model, reward_funcs, args: VLCoTGRPOConfig, train_dataset, processing_class, **kwargs):
        if not isinstance(args, VLCoTGRPOConfig):
            raise TypeError(f"args must be a VLCoTGRPOConfig, got {type(args).__name__}")
        if "lr_image" not in train_dataset.column_names:
            raise ValueError(f"the training dataset needs an 'lr_image' column; it has {train_dataset.column_names}")
        if "prompt" not in train_dataset.column_names:
            train_dataset = train_dataset.add_column("prompt", [args.prompt_template] * len(train_dataset))
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            rollout_func=self._rollout,
            **kwargs,
        )
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if zero3 and not args.ds3_gather_for_generation:
            # Each rank decodes until its own rows are done, so the ranks run different numbers of forward passes;
            # gathering partitioned weights inside every forward would leave one rank waiting on the others.
            raise ValueError(
                "ds3_gather_for_generation: false is not supported under ZeRO-3: VLCoT rollouts gather the weights "
                "once per rollout (the ranks decode different numbers of steps). Set it to true, or use ZeRO-2."
            )
        self.backend = load_backend(self.model, processing_class)
        for module in self.backend.frozen_modules():  # before the optimiser exists (created when training starts)
            module.requires_grad_(False)
        rollout_config = args.rollout_config()
        self.stage_grids = {s: self.backend.grid_for(*rollout_config.stage_sizes[s]) for s in STAGES}
        self.backend.grid_for(args.lr_size, args.lr_size)  # fail now, not at the first step, on a bad size
        self.engine = RolloutEngine(self.model, self.backend, rollout_config)
        self._code_mask = self.backend.image_code_mask.to(self.accelerator.device)
        self._text_mask = self.backend.text_token_mask.to(self.accelerator.device)
        self._batch_inputs: list[dict] | None = None
        #: what the rows about to be scored were sampled with (top-k per token, and in the loss their sampling
        #: log-probs and masks): set by the rollout for the scoring TRL does right after it, and by _compute_loss
        self._scoring: dict | None = None
        self._sampler_settings = sampler_settings(rollout_config)
        self._rollout_seconds = 0.0
        self._merge_buffers: dict = {}  # host copies of the base weights for rollout_merge_adapters, reused
        #: whether rollouts run on the LoRA adapters merged into the weights (rollout_merge_adapters, unless the base
        #: is quantized)
        self.merges_adapters_for_rollouts = args.rollout_merge_adapters
        quantized = quantized_base(self.model) if args.rollout_merge_adapters else None
        if quantized is not None:  # QLoRA: merging would be lossy, so the rollouts use the unmerged adapters
            logger.warning(
                "rollout_merge_adapters: the base weight %s is quantized; rollouts run on the unmerged adapters",
                quantized,
            )
            self.merges_adapters_for_rollouts = False
        for reward in self.reward_funcs:  # load metric weights etc. now, so a missing file fails at start
            if hasattr(reward, "prepare"):
                reward.prepare(self.accelerator.device)

    # ----- generation ------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        self._batch_inputs = inputs  # the rollout needs each row's LR image, which TRL's hook does not pass
        try:
            output = super()._generate_and_score_completions(inputs)
            width = output["completion_ids"].size(1)
            output["sampling_top_k"] = _padded(self._scoring["sampling_top_k"], width, output["completion_ids"])
            if self.args.sampler_correction == "importance":
                self._importance_correct(output)
        finally:
            self._scoring = None
        self._maybe_log_pictures(inputs)
        return output

    def _importance_correct(self, output: dict) -> None:
        """Weights exp(conditional - sampling) per token or sequence, truncated as TRL does for vLLM, folded into
        per-token advantages: every GRPO loss here is linear in a non-negative per-token weight on the advantage."""
        mode = "train" if self.model.training else "eval"
        mask = output["completion_mask"] * output.get("tool_mask", 1)
        old = output.get("old_per_token_logps")
        if old is None:  # TRL skips it when the policy has not moved since sampling; the weights need it
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
            with torch.no_grad():
                old, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, ids, attention, output["completion_ids"].size(1), batch_size=size
                )
        weights, clipped = importance_weights(
            old,
            output["sampling_per_token_logps"],
            mask,
            self.args.vllm_importance_sampling_mode,
            self.args.vllm_importance_sampling_clip_min,
            self.args.vllm_importance_sampling_clip_max,
        )
        advantages = output["advantages"]
        output["advantages"] = (advantages[:, None] if advantages.dim() == 1 else advantages) * weights
        metrics = self._metrics[mode]
        per_token = weights.expand_as(mask)[mask.bool()]
        metrics["sampling/importance_sampling_ratio/mean"].append(
            self.accelerator.gather(per_token.mean()).mean().item()
        )
        metrics["sampling/importance_sampling_ratio/clipped_fraction"].append(
            self.accelerator.gather(clipped.float()).mean().item()
        )

    def _compute_loss(self, model, inputs):
        self._scoring = inputs  # the rows the log-prob pass scores: their sampled top-k, log-probs and masks
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._scoring = None

    def _rollout(self, prompts: list, trainer) -> dict:
        start = time.perf_counter()
        inputs = self._batch_inputs
        if inputs is None or len(inputs) != len(prompts):
            raise RuntimeError("VLCoT rollout called without its batch inputs")
        # TRL repeats each prompt num_generations times, consecutively: encode and prefill each group once.
        groups = _consecutive_groups(inputs)
        size = len(groups[0])
        uniform = all(len(g) == size for g in groups)
        firsts = [g[0] for g in groups] if uniform else list(range(len(inputs)))
        # Under ZeRO-3 the weights (the VQ model's too) are partitioned: gather them once for the whole rollout.
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
            _eval_mode(unwrapped),
            merged_adapters(unwrapped, self._merge_buffers) if self.merges_adapters_for_rollouts else nullcontext(),
        ):
            prompt_ids = [
                encode_prompt(self.backend, inputs[i]["lr_image"], (self.args.lr_size,) * 2, inputs[i]["prompt"])
                for i in firsts
            ]
            self.engine.model = unwrapped
            batch = self.engine.generate(prompt_ids, size if uniform else 1)
            parses = parse_completions(self.backend, batch.completion_ids, self.stage_grids)
        self._scoring = {"sampling_top_k": batch.top_k}
        self._rollout_seconds = time.perf_counter() - start
        self._log_rollout(batch, parses)
        return {
            "prompt_ids": batch.prompt_ids,
            "completion_ids": batch.completion_ids,
            "logprobs": batch.logprobs,  # TRL keeps them as sampling_per_token_logps
            "env_mask": self._loss_mask(batch),  # TRL multiplies this into the loss mask
            "vlcot": parses,
            "stage_texts": [p.texts for p in parses],
            "stage_images": [p.images for p in parses],
        }

    def _loss_mask(self, batch) -> list[list[int]]:
        """1 where a token is trained on: sampled, not forced; and not an image code without image_codes_in_loss."""
        if self.args.image_codes_in_loss:
            return batch.sampled_mask
        codes = self.backend.image_code_mask  # on the host, as the rollout's token ids are
        return [
            (torch.tensor(mask, dtype=torch.bool) & ~codes[torch.tensor(ids, dtype=torch.long)]).int().tolist()
            for mask, ids in zip(batch.sampled_mask, batch.completion_ids)
        ]

    def _log_rollout(self, batch, parses) -> None:
        """The rollout's metrics: format-valid and finished rates, tokens per image, time, decoding counters."""
        # per rank (each rolls out its own prompts, to its own length): the metrics below are the main rank's
        logger.info(
            "rank %d: rolled out %d completions, the longest %d tokens, in %.1f s",
            self.accelerator.process_index,
            len(batch.completion_ids),
            max(len(c) for c in batch.completion_ids),
            self._rollout_seconds,
        )
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        metrics["vlcot/format_valid_rate"].append(sum(p.complete for p in parses) / len(parses))
        metrics["vlcot/finished_rate"].append(sum(batch.finished) / len(batch.finished))
        for stage in STAGES:
            metrics[f"vlcot/tokens_{stage}_image"].append(sum(batch.stage_tokens[stage]) / len(parses))
        metrics["timing/rollout_seconds"].append(self._rollout_seconds)
        for name in ("forward_passes_per_image_token", "accepted_drafts_per_step"):  # rollout_image_decoding jacobi
            if name in batch.decoding:
                metrics[f"vlcot/{name}"].append(batch.decoding[name])
        kept = [k for row in batch.top_k for k in row if k > 0]
        if kept:  # the mean top-k at image-code positions: the entropy rule's k tracks the codes' uncertainty
            metrics["vlcot/image_top_k"].append(sum(kept) / len(kept))

    # ----- log-probs -------------------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **unused_multimodal_kwargs,
    ):
        """Log-probs of the completion tokens: under the sampled distribution (sampler_correction 'guided') or the
        conditional one over the sampler's support and temperatures (see logprob_support)."""
        batch_size = batch_size or input_ids.size(0)
        guided = self.args.sampler_correction == "guided"
        if guided:
            if self._scoring is None or len(self._scoring["sampling_top_k"]) != input_ids.size(0):
                raise RuntimeError("sampler_correction 'guided': log-probs asked for rows the rollout did not sample")
            top_k = _padded(self._scoring["sampling_top_k"], logits_to_keep, input_ids)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with self.accelerator.autocast():
                logits = model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=logits_to_keep + 1
                ).logits
            targets = ids[:, -logits_to_keep:]
            # both chunked, so that memory stays bounded
            masks = {"code_mask": self._code_mask, "text_mask": self._text_mask, "compute_entropy": compute_entropy}
            if guided:
                uncond_logits, uncond_index = self._unconditional_logits(model, ids, mask, logits_to_keep)
                logps, entropy = sampled_logps(
                    logits[:, :-1],
                    targets,
                    settings=self._sampler_settings,
                    top_k=top_k[start : start + batch_size],
                    uncond_logits=uncond_logits,
                    uncond_index=uncond_index,
                    **masks,
                )
            else:
                logps, entropy = completion_logps(
                    logits[:, :-1],
                    targets,
                    text_temperature=self.temperature,
                    image_temperature=self.args.image_temperature,
                    restricted=self.args.logprob_support == "restricted",
                    **masks,
                )
            all_logps.append(logps)
            if compute_entropy:
                all_entropies.append(entropy)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        logps = torch.cat(all_logps)
        self._log_sampling_gap(logps)
        return logps, entropies, None

    def _unconditional_logits(self, model, ids, mask, logits_to_keep):
        """The guidance branch's logits over the images of these rows (``logprobs.guidance_rows``) and the index of
        the row that guided each target; (None, None) without guidance. One forward pass per call, whatever the
        rows hold, so that ZeRO-3 ranks gather the same parameters."""
        if self._sampler_settings["guidance_scale"] == 1.0:
            return None, None
        rows = guidance_rows(self.engine, ids, mask, logits_to_keep)
        with self.accelerator.autocast():
            logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.positions)
        return logits.logits, rows.index

    def _log_sampling_gap(self, logps: torch.Tensor) -> None:
        """In the loss: mean and max |sampling - trained| log-prob over the sampled tokens."""
        inputs = self._scoring
        if inputs is None or "sampling_per_token_logps" not in inputs:
            return
        mask = (inputs["completion_mask"] * inputs.get("tool_mask", 1)).bool()
        gap = (inputs["sampling_per_token_logps"] - logps.detach()).abs()[mask]
        mean = gap.mean() if gap.numel() else gap.new_zeros(())
        top = gap.max() if gap.numel() else gap.new_zeros(())
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["sampling/sampling_logp_difference/mean"].append(
            self.accelerator.gather(mean).mean().item()
        )
        self._metrics[mode]["sampling/sampling_logp_difference/max"].append(self.accelerator.gather(top).max().item())

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # a full model's checkpoint through from_pretrained (see load_checkpoint_weights); adapters as transformers
        if not load_checkpoint_weights(model if model is not None else self.model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    # ----- logging ---------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch):
        start = time.perf_counter()
        self._rollout_seconds = 0.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._metrics["train"]["timing/train_seconds"].append(time.perf_counter() - start - self._rollout_seconds)
        return loss

    def _maybe_log_pictures(self, inputs):
        # The rollout runs inside the training step, before the optimizer step that the batch's scalars are logged
        # at (global_step + 1): the pictures take that step too, and come at step 1 and every image_log_steps.
        every, step = self.args.image_log_steps, self.state.global_step + 1
        if not every or (step % every and step != 1) or not self.accelerator.is_main_process:
            return
        if getattr(self, "_pictured_step", None) == step:
            return
        self._pictured_step = step
        from vlcot_grpo.pictures import log_pictures

        # the deque holds the last gathered batch; the main process owns its first rows
        rewards = {name: list(values)[: len(inputs)] for name, values in self._logs["rewards"].items()}
        weights = dict(zip(self.reward_func_names, self.reward_weights.tolist()))
        folder = Path(self.args.output_dir) / "samples"
        log_pictures(self, inputs[: self.args.image_log_samples], rewards, folder, step, weights)


def _padded(rows, width: int, like: torch.Tensor) -> torch.Tensor:
    """Per-row lists (or a (B, T) tensor) as a (B, width) long tensor on ``like``'s device: cut or padded with 0."""
    if isinstance(rows, torch.Tensor):
        rows = rows[:, :width]
        return torch.nn.functional.pad(rows, (0, width - rows.size(1))).to(like.device)
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for i, values in enumerate(rows):
        values = values[:width]
        out[i, : len(values)] = torch.tensor(values, dtype=torch.long)
    return out.to(like.device)


def _consecutive_groups(inputs: list[dict]) -> list[list[int]]:
    """Indices of runs of consecutive rows that are the same prompt (same LR image and prompt text)."""
    groups: list[list[int]] = []
    for i, row in enumerate(inputs):
        if groups and _same_prompt(inputs[groups[-1][0]], row):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _same_prompt(a: dict, b: dict) -> bool:
    if a.get("prompt") != b.get("prompt"):
        return False
    if a["lr_image"] is b["lr_image"]:
        return True
    return a["lr_image"].size == b["lr_image"].size and a["lr_image"].tobytes() == b["lr_image"].tobytes()


class _eval_mode:
    """Dropout off while sampling; the previous mode is restored afterwards."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
