"""Cold start: supervised fine-tuning on VLCoT traces, so that GRPO starts from a model that writes the seven blocks.

``python -m vlcot_grpo.sft --config recipes/<model>/sft/<name>.yaml [--key value ...]`` (also under
``accelerate launch [--config_file accelerate_configs/zero2.yaml] -m vlcot_grpo.sft ...``). Script, training and
model arguments come from one YAML file (TRL's parser); the command line overrides it.

Each sample of a VLCoT dataset becomes one trace (``vlcot_grpo.traces``): the prompt with the LR image's tokens, then
the full chain with the stage targets' VQ tokens. Training is TRL's ``SFTTrainer`` on pre-tokenised sequences with
the loss on the completion only; ``VLCoTSFTTrainer`` adds one thing, an optional weight of the loss on image-code
tokens relative to the text (``image_loss_weight``).

What GRPO loads afterwards (``model_name_or_path`` of the GRPO recipe) is always ``output_dir``: a full model and its
tokenizer. With LoRA (``use_peft: true``) the adapter alone is kept in ``output_dir/adapter`` and ``output_dir`` holds
the base model with the adapter merged in.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from peft.utils.other import TrainableTokensWrapper
from trl import SFTConfig, SFTTrainer

from vlcot_grpo.card import ModelCardMixin
from vlcot_grpo.config import VLCoTFields, checkpointing_default
from vlcot_grpo.models import load_backend, load_checkpoint_weights, load_model, unwrap_model
from vlcot_grpo.script_utils import SharedScriptArguments, load_policy, make_trainer, save_run_record, start_run
from vlcot_grpo.traces import build_trace_dataset
from vlcot_grpo.vlcot import STAGES

#: Subfolder of output_dir that keeps the LoRA adapter alone.
ADAPTER_SUBDIR = "adapter"


# ----- configuration ---------------------------------------------------------------------------------------------


@dataclass
class VLCoTSFTConfig(VLCoTFields, SFTConfig):
    """SFT settings for VLCoT traces. Sizes must match the GRPO recipe that continues from this model."""

    image_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the loss on image-code tokens relative to all other completion tokens (text, tags, "
            "image layout, EOS). The loss is the weighted mean: 1.0 = plain SFT, 0.0 = text and layout only."
        },
    )
    trace_batch_size: int = field(
        default=16, metadata={"help": "Samples VQ-encoded per call while the traces are built."}
    )
    format_check_samples: int = field(
        default=0,
        metadata={
            "help": "After training, roll out greedily on this many training prompts and log the rate of "
            "format-valid completions (all seven blocks, images well-formed). 0 = skip."
        },
    )
    # Changed defaults of SFTConfig fields:
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest trace (prompt + completion, tokens); a longer trace is an error, never truncated, since "
            "truncation would cut off the final image and teach a broken chain. None = no limit."
        },
    )
    completion_only_loss: bool | None = field(
        default=True,
        metadata={"help": "Loss on the completion only (default). False also trains on the prompt and LR image."},
    )

    def __post_init__(self):
        checkpointing_default(self)
        super().__post_init__()
        self.check_sizes("trace_batch_size")
        if self.image_loss_weight < 0:
            raise ValueError(f"image_loss_weight must be >= 0, got {self.image_loss_weight}")
        if self.format_check_samples < 0:
            raise ValueError(f"format_check_samples must be >= 0, got {self.format_check_samples}")


# ----- trainer ---------------------------------------------------------------------------------------------------


def sft_features(traces: datasets.Dataset, max_length: int | None = None) -> datasets.Dataset:
    """Trace columns (``prompt_ids``, ``completion_ids``) -> the pre-tokenised columns SFTTrainer reads:
    ``input_ids`` (prompt + completion) and ``completion_mask`` (0 on the prompt, 1 on the completion)."""
    lengths = [len(p) + len(c) for p, c in zip(traces["prompt_ids"], traces["completion_ids"])]
    if max_length is not None and lengths and max(lengths) > max_length:
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        raise ValueError(
            f"trace {longest} has {lengths[longest]} tokens, more than max_length={max_length}; raise max_length "
            "(or set it to null) or use smaller lr_size/stage sizes: a truncated trace teaches a broken chain"
        )

    def join(row):
        prompt, completion = row["prompt_ids"], row["completion_ids"]
        return {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}

    return traces.map(join, remove_columns=traces.column_names)


class VLCoTSFTTrainer(ModelCardMixin, SFTTrainer):
    """``SFTTrainer`` on VLCoT traces.

    ``train_dataset`` is either a VLCoT dataset (columns ``lr_image``, ``degradation_text``, ``target_*``, ...: the
    traces are built here with the sizes in ``args``) or a trace dataset (``prompt_ids``, ``completion_ids``, from
    ``vlcot_grpo.traces.build_trace_dataset``). ``model`` is a loaded model or a checkpoint path.
    """

    def __init__(self, model, args: VLCoTSFTConfig, train_dataset, processing_class, **kwargs):
        if not isinstance(args, VLCoTSFTConfig):
            raise TypeError(f"args must be a VLCoTSFTConfig, got {type(args).__name__}")
        if isinstance(model, (str, os.PathLike)):
            model = load_model(str(model), **{"dtype": torch.float32, **(args.model_init_kwargs or {})})
        if args.image_loss_weight != 1.0:
            _check_weighted_loss_supported(args, kwargs)
        backend = load_backend(model, processing_class)
        for name, side in [("lr_size", args.lr_size)] + [(f"{s}_size", args.stage_sizes[s][0]) for s in STAGES]:
            if side % backend.downsample:
                raise ValueError(
                    f"{name}={side} is not a multiple of the model's downsample factor {backend.downsample}"
                )
        for module in backend.frozen_modules():
            module.requires_grad_(False)

        self.trace_dataset = self._as_traces(backend, train_dataset, args)
        super().__init__(
            model=model,
            args=args,
            train_dataset=sft_features(self.trace_dataset, args.max_length),
            processing_class=processing_class,
            **kwargs,
        )
        _let_fused_head_read_token_rows(self.model)
        self.backend = load_backend(self.model, processing_class)
        if not self.backend.single_output_layer:
            _score_fused_calls_from_full_logits(self.model)
        self._code_mask = self.backend.image_code_mask.to(self.accelerator.device)

    @staticmethod
    def _as_traces(backend, dataset: datasets.Dataset, args: VLCoTSFTConfig) -> datasets.Dataset:
        columns = dataset.column_names
        if "prompt_ids" in columns and "completion_ids" in columns:
            return dataset.select_columns(["prompt_ids", "completion_ids"])
        return build_trace_dataset(
            backend,
            dataset,
            lr_size=args.lr_size,
            stage_sizes=args.stage_sizes,
            prompt=args.prompt_template,
            batch_size=args.trace_batch_size,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # a full model's checkpoint through from_pretrained (see load_checkpoint_weights); adapters as transformers
        if not load_checkpoint_weights(model if model is not None else self.model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    # ----- the image-weighted loss -----------------------------------------------------------------------------
    def token_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss weights for next-token ``labels`` (-100 = no loss): image codes get ``image_loss_weight``,
        every other trained token 1, ignored positions 0."""
        is_code = self._code_mask.to(labels.device)[labels.clamp(min=0)]
        weights = torch.where(is_code, self.args.image_loss_weight, 1.0)
        return weights * (labels != -100)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.image_loss_weight == 1.0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Same fused forward as SFTTrainer (log-probs of the labels, no full logits), then a weighted mean.
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        weights = self.token_weights(inputs["labels"][:, 1:]).to(outputs.log_probs.dtype)
        # num_items_in_batch is the weight sum over the whole accumulated batch (see _get_num_items_in_batch)
        total_weight = weights.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -(outputs.log_probs * weights).sum() / torch.as_tensor(total_weight).clamp(min=1e-8)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the weight sum is global
        self._log_token_metrics(outputs, inputs, mode)
        if return_outputs:
            raise ValueError("return_outputs is not supported with image_loss_weight != 1 (no logits are built)")
        return loss

    def _get_num_items_in_batch(self, batch_samples, device):
        """With image weighting, the loss normaliser is the summed token weight, not the token count."""
        count = super()._get_num_items_in_batch(batch_samples, device)
        if count is None or self.args.image_loss_weight == 1.0:
            return count
        weight = sum(self.token_weights(batch["labels"][..., 1:].to(device)).sum() for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            weight = self.accelerator.gather(weight.to(device)).sum()
        return weight.to(device)

    def _log_token_metrics(self, outputs, inputs, mode: str) -> None:
        """The metrics SFTTrainer.compute_loss logs (entropy, token accuracy, tokens seen), for the weighted path."""
        gather = self.accelerator.gather_for_metrics
        valid = gather(outputs.label_mask.sum()).sum()
        if valid > 0:
            self._metrics[mode]["entropy"].append((gather(outputs.entropy.detach().sum()).sum() / valid).item())
            self._metrics[mode]["mean_token_accuracy"].append((gather(outputs.is_top1.sum()).sum() / valid).item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


class _FusedHeadTokens(TrainableTokensWrapper):
    """PEFT's trainable-token wrapper of a head, with the head's ``bias`` readable as TRL's fused LM head needs."""

    @property
    def bias(self):
        return self.token_adapter.base_layer.bias


def _let_fused_head_read_token_rows(model) -> None:
    """SFTTrainer's loss projects through the head's ``weight`` and ``bias`` directly (TRL's fused LM head). With the
    tags' head rows trained under LoRA (``trainable_token_indices``), the head is PEFT's ``TrainableTokensWrapper``,
    which answers ``weight`` (its rows merged in, so the gradient reaches them) but not ``bias``: give it that."""
    head = unwrap_model(model).get_output_embeddings()
    if type(head) is TrainableTokensWrapper:
        head.__class__ = _FusedHeadTokens


def _score_fused_calls_from_full_logits(model) -> None:
    """SFTTrainer scores labels through TRL's fused LM head, which multiplies the hidden states by
    ``get_output_embeddings().weight`` alone. A family whose logits come from more than one head (Janus: the text
    head and the image head, ``single_output_layer = False``) would be scored on its text head only, so for it the
    fused call is answered from the model's own full logits: the same fields, log-softmaxed in float32 in chunks of
    positions. It costs the full logits of a batch, as the GRPO loss does."""
    base = unwrap_model(model)  # TRL patched the transformers model itself, under any PEFT wrapper
    own_forward = type(base).forward.__get__(base)

    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return own_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        logits = own_forward(*args, **{**kwargs, "use_cache": False}).logits
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        return _fused_output(logits, labels, num_items_in_batch)

    base.forward = forward


def _fused_output(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, chunk: int = 1024):
    """TRL's ``FusedCausalLMOutput`` (log-probs, entropy, top-1 of each label; ``-100`` = no label) from full logits."""
    from trl.trainer.utils import FusedCausalLMOutput

    mask = labels != -100
    rows, targets = logits[mask], labels[mask]
    log_probs, entropy, is_top1 = [], [], []
    for start in range(0, max(len(targets), 1), chunk):  # an empty batch still runs once: its loss stays connected
        scores = torch.log_softmax(rows[start : start + chunk].float(), dim=-1)
        target = targets[start : start + chunk, None]
        log_probs.append(scores.gather(-1, target)[:, 0])
        with torch.no_grad():
            entropy.append(-(scores.exp() * scores).sum(-1))
            is_top1.append(scores.argmax(-1) == target[:, 0])

    def spread(values, dtype=torch.float32):
        flat = torch.cat(values)
        return torch.zeros(mask.shape, dtype=dtype, device=logits.device).masked_scatter(mask, flat)

    per_token = spread(log_probs)
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-per_token.sum() / count,
        log_probs=per_token,
        entropy=spread(entropy),
        is_top1=spread(is_top1, torch.bool),
        label_mask=mask,
    )


def _check_weighted_loss_supported(args: VLCoTSFTConfig, trainer_kwargs: dict) -> None:
    clashes = []
    if args.loss_type != "nll":
        clashes.append(f"loss_type={args.loss_type!r}")
    if args.label_smoothing_factor > 0:
        clashes.append(f"label_smoothing_factor={args.label_smoothing_factor}")
    if args.padding_free or args.packing:
        clashes.append("padding_free/packing")
    if trainer_kwargs.get("compute_loss_func") is not None:
        clashes.append("compute_loss_func")
    if clashes:
        raise ValueError(
            f"image_loss_weight={args.image_loss_weight} needs the plain NLL loss on padded batches; it cannot be "
            f"combined with {', '.join(clashes)}. Set image_loss_weight: 1.0 or drop those settings."
        )


# ----- model loading, evaluation, saving -------------------------------------------------------------------------


@torch.no_grad()
def format_valid_rate(
    model, tokenizer, prompt_ids: list[list[int]], args: VLCoTSFTConfig, max_new_tokens: int
) -> float:
    """Share of greedy rollouts (rollout engine, forced image layouts) that hold all seven well-formed blocks."""
    from vlcot_grpo.rollout import RolloutConfig, RolloutEngine
    from vlcot_grpo.vlcot import parse_completions

    backend = load_backend(model, tokenizer)
    config = RolloutConfig(stage_sizes=args.stage_sizes, max_new_tokens=max_new_tokens, do_sample=False)
    was_training = model.training
    model.eval()
    try:
        batch = RolloutEngine(model, backend, config).generate(prompt_ids)
    finally:
        model.train(was_training)
    grids = {stage: backend.grid_for(*size) for stage, size in args.stage_sizes.items()}
    parses = parse_completions(backend, batch.completion_ids, grids, decode_images=False)
    return sum(p.complete for p in parses) / len(parses)


def check_saved_model(model_dir: Path, traces: datasets.Dataset, args: VLCoTSFTConfig) -> tuple[float, int]:
    """Format-valid rate of the saved model (what GRPO will load) on the first ``args.format_check_samples`` traces'
    prompts, and the number of rollouts. Loaded afresh on one process, so it works whatever sharding trained it."""
    from transformers import AutoTokenizer

    traces = traces.select(range(min(args.format_check_samples, len(traces))))
    longest = max(len(ids) for ids in traces["completion_ids"])
    model = load_model(str(model_dir), dtype=torch.float32)
    rate = format_valid_rate(model, AutoTokenizer.from_pretrained(model_dir), traces["prompt_ids"], args, 2 * longest)
    return rate, len(traces)


def save_for_grpo(trainer: VLCoTSFTTrainer, tokenizer, base_model_path: str | os.PathLike) -> Path:
    """Save what GRPO loads (a full model + tokenizer in ``output_dir``) and return that folder.

    A full fine-tune is saved as is. A LoRA adapter is saved to ``output_dir/adapter``, then merged into a fresh copy
    of the base model on the main process (works whatever sharding trained it) and saved to ``output_dir``.
    """
    from peft import PeftModel

    output_dir = Path(trainer.args.output_dir)
    if not isinstance(trainer.model, PeftModel):
        trainer.save_model(str(output_dir))
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(output_dir)
        return output_dir
    adapter_dir = output_dir / ADAPTER_SUBDIR
    trainer.save_model(str(adapter_dir))
    if trainer.accelerator.is_main_process:
        base = load_model(str(base_model_path), dtype="auto")
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    trainer.accelerator.wait_for_everyone()
    return output_dir


# ----- script ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    from trl import ModelConfig, TrlParser

    from vlcot_grpo.config import check_recipe_keys

    types = (SharedScriptArguments, VLCoTSFTConfig, ModelConfig)
    check_recipe_keys(argv, types)
    return TrlParser(types).parse_args_and_config(args=argv)


def main(argv=None) -> Path:
    """Run the cold start; returns ``output_dir``, the folder the GRPO recipe loads as ``model_name_or_path``."""
    run = start_run(argv, parse_args)
    script_args, training_args, model_args = run.script_args, run.training_args, run.model_args
    model, tokenizer = load_policy(model_args, training_args, script_args)
    trainer = make_trainer(VLCoTSFTTrainer, "sft", run, model, tokenizer)
    trainer.train(resume_from_checkpoint=run.resume)
    output_dir = save_for_grpo(trainer, tokenizer, model_args.model_name_or_path)
    if trainer.accelerator.is_main_process:
        save_run_record(trainer, output_dir, adapter=False)  # output_dir holds the full (merged) model
        if (output_dir / ADAPTER_SUBDIR).is_dir():
            save_run_record(trainer, output_dir / ADAPTER_SUBDIR, adapter=True)
        print(f"SFT done. GRPO loads: model_name_or_path: {output_dir}")
        if training_args.format_check_samples:
            rate, count = check_saved_model(output_dir, trainer.trace_dataset, training_args)
            print(f"  format-valid rate of {count} greedy rollouts on training prompts: {rate:.2f}")
    return output_dir


if __name__ == "__main__":
    main(sys.argv[1:])
