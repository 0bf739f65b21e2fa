"""Model backends: one small interface (``ImageTokenBackend``) over each unified model family.

``load_backend(model, tokenizer)`` picks the backend from the model's config, so callers never name a family.
Emu3, PURE / Lumina-mGPT (the paper's model: ``vlcot-grpo convert`` builds its folder) and Janus / Janus-Pro (image
codes on their own table and head, shown as one vocabulary) are here; adding a family means one subclass and one entry
in ``BACKENDS``.
"""

from vlcot_grpo.models.base import CODE, ImageParse, ImageTokenBackend, unwrap_model, without_zero3_init
from vlcot_grpo.models.emu3 import Emu3Backend
from vlcot_grpo.models.janus import JanusBackend, JanusForVLCoT
from vlcot_grpo.models.prepare import TagTokens, add_vlcot_tokens, check_vlcot_tokens, prepare_checkpoint
from vlcot_grpo.models.pure import PureBackend, PureConfig, PureForConditionalGeneration

#: model_type in the transformers config -> backend class
BACKENDS: dict[str, type[ImageTokenBackend]] = {"emu3": Emu3Backend, "vlcot_pure": PureBackend, "janus": JanusBackend}


def load_model(path: str, **from_pretrained_kwargs):
    """Load a checkpoint with the model class of its family (read from its config), like a user's real checkpoint."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in BACKENDS:
        raise ValueError(
            f"{path}: model_type {model_type!r} has no image-token backend; available: {sorted(BACKENDS)}"
        )
    with without_zero3_init():  # see its docstring: Emu3's init fails on ZeRO-3-partitioned tensors
        return BACKENDS[model_type].model_class.from_pretrained(path, **from_pretrained_kwargs)


def load_checkpoint_weights(model, folder: str) -> bool:
    """Load a Trainer checkpoint's full model weights into ``model`` through ``from_pretrained``; False (nothing
    done) for a PEFT model or a folder without a ``config.json``.

    Why not transformers' ``Trainer._load_from_checkpoint``: transformers 5 saves some families (Emu3 among them)
    under their original checkpoint key names (``text_model.model.layers...``), and the Trainer loads a checkpoint
    with a plain non-strict ``load_state_dict``, which then silently loads none of the language model: a resumed
    full fine-tune went on from the base weights. ``from_pretrained`` maps the names back; the load is strict."""
    from pathlib import Path

    if hasattr(model, "peft_config") or not (Path(folder) / "config.json").is_file():
        return False
    reference = next(model.parameters())
    with without_zero3_init():
        saved = type(model).from_pretrained(folder, dtype=reference.dtype)
    model.load_state_dict(saved.state_dict(), strict=True)
    return True


def load_backend(model, tokenizer) -> ImageTokenBackend:
    """The backend for ``model`` (a transformers model, possibly wrapped by PEFT or DeepSpeed)."""
    model_type = getattr(unwrap_model(model).config, "model_type", None)
    if model_type not in BACKENDS:
        raise ValueError(
            f"no image-token backend for model_type {model_type!r}; available: {sorted(BACKENDS)}. "
            "Write a subclass of vlcot_grpo.models.ImageTokenBackend and register it in vlcot_grpo.models.BACKENDS."
        )
    return BACKENDS[model_type](model, tokenizer)


__all__ = [
    "BACKENDS",
    "CODE",
    "Emu3Backend",
    "ImageParse",
    "ImageTokenBackend",
    "JanusBackend",
    "JanusForVLCoT",
    "PureBackend",
    "PureConfig",
    "PureForConditionalGeneration",
    "TagTokens",
    "add_vlcot_tokens",
    "check_vlcot_tokens",
    "load_backend",
    "load_checkpoint_weights",
    "load_model",
    "prepare_checkpoint",
    "unwrap_model",
]
