"""``VLCoTGRPOConfig``: TRL's ``GRPOConfig`` plus what a VLCoT rollout needs. Every field carries its help text."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from trl import GRPOConfig

from vlcot_grpo.logprobs import IMPORTANCE_MODES
from vlcot_grpo.rollout import RolloutConfig
from vlcot_grpo.vlcot import DEFAULT_PROMPT, stage_sizes_of

#: the choices of VLCoTGRPOConfig.sampler_correction
SAMPLER_CORRECTIONS = ("guided", "importance", "none")

#: GRPOConfig generation fields the VLCoT rollout does not honour, with the value that means "unused"
UNSUPPORTED_GENERATION = {
    "repetition_penalty": 1.0,
    "generation_kwargs": None,
    "cache_implementation": None,
    "use_vllm": False,
    "use_transformers_paged": False,
    "chat_template_kwargs": None,
}


#: VLCoTGRPOConfig field -> the RolloutConfig field it sets: the one mapping between the two, used by
#: ``VLCoTGRPOConfig.rollout_config`` (upscale's flags name the RolloutConfig fields they set the same way).
ROLLOUT_OPTIONS = {
    "rollout_engine": "engine",
    "rollout_compile": "compile_step",
    "rollout_share_prompt_cache": "share_prompt_cache",
    "rollout_fuse_projections": "fuse_projections",
    "rollout_image_decoding": "image_decoding",
    "rollout_jacobi_window": "jacobi_window",
}


def rollout_option(name: str):
    """A config field mirroring ``RolloutConfig.<name>``: its default, help and choices, so they are written once."""
    source = {f.name: f for f in dataclasses.fields(RolloutConfig)}[name]
    metadata = dict(source.metadata)
    metadata["help"] = f"{metadata['help']} (RolloutConfig.{name})"
    return field(default=source.default, metadata=metadata)


@dataclass
class VLCoTFields:
    """The fields both training configs add (SFT's traces and GRPO's rollouts must agree on them): the sizes of
    the input and of the three stage images, the instruction, and transformers 4's name for checkpointing."""

    lr_size: int = field(
        default=512,
        metadata={"help": "Side (pixels) the low-quality input is resized to before tokenisation (the paper: 512)."},
    )
    rough_size: int = field(default=128, metadata={"help": "Side (pixels) of the rough image (the paper: 128)."})
    middle_size: int = field(default=256, metadata={"help": "Side (pixels) of the middle image (the paper: 256)."})
    final_size: int = field(default=512, metadata={"help": "Side (pixels) of the final image (the paper: 512)."})
    prompt_template: str = field(
        default=DEFAULT_PROMPT,
        metadata={
            "help": "Instruction text with the image placeholder '<|image|>'; used for rows without a 'prompt' column."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5); use that instead."},
    )

    @property
    def stage_sizes(self) -> dict[str, tuple[int, int]]:
        return stage_sizes_of(self)

    def check_sizes(self, *extra: str) -> None:
        for name in ("lr_size", "rough_size", "middle_size", "final_size", *extra):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class VLCoTGRPOConfig(VLCoTFields, GRPOConfig):
    """GRPO settings for VLCoT rollouts. Text sampling uses GRPOConfig's ``temperature``, ``top_k`` (1 = the paper's
    greedy text), ``top_p`` and ``min_p``; ``repetition_penalty``, ``generation_kwargs``, ``cache_implementation``
    and vLLM are refused at start (the VLCoT engine does not use them). ``max_completion_length`` bounds a whole
    completion (text and all three images)."""

    guidance_scale: float = field(
        default=1.0,
        metadata={
            "help": "Classifier-free guidance for image codes in transformers' convention: guided = u + s (c - u)"
            " on log-probs, 1.0 = off (the paper's RL code: 0.8). The unconditional branch sees only the current "
            "image's tokens."
        },
    )
    image_temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of image codes."})
    image_top_k: int = field(
        default=-1,
        metadata={
            "help": "Top-k for image codes: 0 = off, > 0 fixed, -1 = the paper's entropy-dependent "
            "k = round(1 + 1999 sigmoid(H - 5)), H the entropy of the guided code distribution before temperature, "
            "clipped to [0, 10]. Order: guidance, entropy, top-k, temperature."
        },
    )
    sampler_correction: str = field(
        default="guided",
        metadata={
            "help": "How the loss accounts for codes drawn with guidance and top-k. 'guided' (default): the trained "
            "log-probs are those of the distribution sampled (guidance, with the unconditional branch run over each "
            "image's tokens in the log-prob pass; top-k with the sampled k; the text filters), so GRPO is on-policy. "
            "'importance': the conditional log-probs (logprob_support), corrected by truncated importance weights "
            "against the sampling log-probs (vllm_importance_sampling_mode / _clip_min / _clip_max, as TRL does for "
            "vLLM rollouts). 'none': the conditional log-probs uncorrected (the paper).",
            "choices": list(SAMPLER_CORRECTIONS),
        },
    )
    vllm_importance_sampling_mode: str = field(
        default="token_truncate",
        metadata={
            "help": "sampler_correction 'importance' (and vLLM in TRL): 'token_truncate' (default here: per-token "
            "weights clipped to [clip_min, clip_max]), 'token_mask' (weights outside set to 0), 'sequence_truncate' "
            "or 'sequence_mask' (one weight per completion, the product over its tokens: with thousands of guided "
            "codes it is almost always outside the bounds).",
            "choices": list(IMPORTANCE_MODES),
        },
    )
    # the static engine's options, mirrored from RolloutConfig (ROLLOUT_OPTIONS: one default, help and choice list)
    rollout_engine: str = rollout_option("engine")
    rollout_compile: bool | None = rollout_option("compile_step")
    rollout_share_prompt_cache: bool | None = rollout_option("share_prompt_cache")
    rollout_fuse_projections: bool | None = rollout_option("fuse_projections")
    rollout_image_decoding: str = rollout_option("image_decoding")
    rollout_jacobi_window: int = rollout_option("jacobi_window")
    image_codes_in_loss: bool = field(
        default=True,
        metadata={
            "help": "Whether sampled image codes are trained on. False: only the sampled text tokens (tags, "
            "degradation and descriptions) carry the chain's advantage, so a reward on the format or the texts "
            "does not also push the chain's image codes; forced layout tokens are never trained on."
        },
    )
    rollout_merge_adapters: bool = field(
        default=True,
        metadata={
            "help": "With LoRA: merge the adapters into the base weights for each rollout (rollouts then run at the "
            "base model's speed) and restore the exact base weights afterwards from a host copy. Costs host "
            "memory: one pinned copy of the adapted base weights per process. Quantized bases (QLoRA) are never "
            "merged."
        },
    )
    logprob_support: str = field(
        default="restricted",
        metadata={
            "help": "sampler_correction 'importance' or 'none': how the conditional log-probs are normalised. "
            "'restricted' (default): image-code positions over the image codes, text positions over the text "
            "vocabulary, each at its own temperature. 'full': over the whole vocabulary. 'guided' scores the "
            "sampled distribution itself and needs 'restricted'.",
            "choices": ["restricted", "full"],
        },
    )
    image_log_steps: int = field(
        default=10,
        metadata={
            "help": "Every this many steps, save a picture per sample (LR | rough | middle | final, texts, "
            "rewards) under output_dir/samples and send it to TensorBoard / W&B. 0 = never."
        },
    )
    image_log_samples: int = field(default=4, metadata={"help": "How many samples per logged step get a picture."})

    def __post_init__(self):
        checkpointing_default(self)
        super().__post_init__()
        self.check_sizes()
        try:  # the rollout options are checked where they are defined
            self.rollout_config()
        except ValueError as err:
            raise ValueError(f"rollout settings: {err}") from None
        if self.logprob_support not in ("restricted", "full"):
            raise ValueError(f"logprob_support must be 'restricted' or 'full', got {self.logprob_support!r}")
        if self.sampler_correction not in SAMPLER_CORRECTIONS:
            raise ValueError(
                f"sampler_correction must be one of {SAMPLER_CORRECTIONS}, got {self.sampler_correction!r}"
            )
        if self.sampler_correction == "guided" and self.logprob_support == "full":
            raise ValueError(
                "logprob_support: 'full' does not apply to sampler_correction: 'guided' (it scores the sampled "
                "distribution, whose support is the sampler's); use 'restricted', or sampler_correction 'none'"
            )
        if self.sampler_correction == "importance" and self.loss_type == "vespo":
            raise ValueError("sampler_correction: 'importance' does not combine with loss_type: 'vespo'")
        for name, unused in UNSUPPORTED_GENERATION.items():
            value = getattr(self, name, unused)
            if value != unused and not (unused is None and value in ({}, "")):
                raise ValueError(
                    f"{name}={value!r} is not honoured by the VLCoT rollout engine (it samples text with "
                    f"temperature, top_k, top_p and min_p, and image codes with image_temperature, image_top_k and "
                    f"guidance_scale); remove it or set it to {unused!r}"
                )

    def rollout_config(self) -> RolloutConfig:
        return RolloutConfig(
            stage_sizes=self.stage_sizes,
            max_new_tokens=self.max_completion_length,
            do_sample=True,
            text_temperature=self.temperature,
            text_top_k=self.top_k or 0,
            text_top_p=self.top_p,
            text_min_p=self.min_p or 0.0,
            image_temperature=self.image_temperature,
            image_top_k=self.image_top_k,
            guidance_scale=self.guidance_scale,
            **{option: getattr(self, name) for name, option in ROLLOUT_OPTIONS.items()},
        )


def checkpointing_default(config) -> None:
    """TRL turns activation checkpointing on by default, but under its deprecated name ``gradient_checkpointing``,
    which makes transformers warn on every run; the VLCoT configs leave that name unset and keep TRL's default
    under the new one. A ``gradient_checkpointing`` set by hand still works (with transformers' warning)."""
    if config.activation_checkpointing is None and config.gradient_checkpointing is None:
        config.activation_checkpointing = True


def check_recipe_keys(argv: list[str] | None, dataclass_types) -> None:
    """Fail on a recipe key that no argument dataclass knows, naming the file and suggesting the closest known key.
    TRL's parser refuses such a key too, but names neither the file nor a likely spelling."""
    import dataclasses
    import difflib
    import sys

    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    known = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    _check_command_line(argv, dataclass_types, known)
    if "--config" not in argv:
        return
    path = argv[argv.index("--config") + 1]
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe not found: {path}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a mapping of argument names to values, got {type(recipe).__name__}")
    for key in sorted(set(recipe) & set(DEPRECATED_KEYS)):
        raise ValueError(f"recipe {path}: {key!r} is deprecated (transformers 5); use {DEPRECATED_KEYS[key]!r}")
    unknown = sorted(set(recipe) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"recipe {path}: unknown keys " + ", ".join(hints))


#: keys transformers 5 still reads but has deprecated, with their replacement; refused in recipes
DEPRECATED_KEYS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _check_command_line(argv: list[str], dataclass_types, known: set[str]) -> None:
    """Fail on a ``--key`` no argument dataclass knows, suggesting the closest, before TRL's parser gives its
    generic "the following arguments are not recognized"."""
    import dataclasses
    import difflib

    negatable = {f"no_{f.name}" for t in dataclass_types for f in dataclasses.fields(t) if f.default is True}
    accepted = known | negatable | {"config", "help", "h"}
    for token in argv:
        if not token.startswith("--") or token == "--":
            continue
        key = token[2:].split("=", 1)[0].replace("-", "_")
        if key not in accepted:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '--{close[0]}'?)" if close else ""
            raise ValueError(f"unknown command-line option {token.split('=', 1)[0]!r}{hint}")
