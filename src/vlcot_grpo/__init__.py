"""vlcot-grpo: GRPO with a Vision-Language Chain of Thought for real-world image super-resolution.

Heavy parts (trl, deepspeed, pyiqa) are imported lazily, so ``import vlcot_grpo`` is quick and never touches a network.
"""

import logging
from importlib import import_module

# bitsandbytes logs an error-looking warning on import on CPUs with AVX512-BF16 when the optional `kernels` package
# is missing (its 4-bit CPU kernel then falls back to its own, which works); PEFT imports it on every command, QLoRA
# or not, so the line only alarms. Real bitsandbytes errors (level ERROR) still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained": "vlcot_grpo.loading",
    "ImageTokenBackend": "vlcot_grpo.models",
    "load_backend": "vlcot_grpo.models",
    "parse_completion": "vlcot_grpo.vlcot",
    "parse_completions": "vlcot_grpo.vlcot",
    "DEFAULT_PROMPT": "vlcot_grpo.vlcot",
    "BLOCKS": "vlcot_grpo.vlcot",
    "VLCoTGRPOConfig": "vlcot_grpo.config",
    "VLCoTGRPOTrainer": "vlcot_grpo.trainer",
    "RolloutEngine": "vlcot_grpo.rollout",
    "load_rewards": "vlcot_grpo.rewards",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlcot_grpo' has no attribute {name!r}")


__all__ = sorted(_LAZY)
