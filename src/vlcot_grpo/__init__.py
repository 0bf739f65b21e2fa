"""vlcot-grpo: GRPO with a Vision-Language Chain of Thought for real-world image super-resolution.

Heavy parts (trl, deepspeed, pyiqa) are imported lazily, so ``import vlcot_grpo`` is quick and never touches a network.
"""

import logging
from importlib import import_module

# On CPUs with AVX512-BF16, bitsandbytes tries on import to fetch a 4-bit CPU kernel from the Hub through the
# `kernels` package (a dependency of transformers since 5.25) and falls back to its own kernel, which works, when that
# fails. PEFT imports bitsandbytes on every command, QLoRA or not, so two lines only alarm: bitsandbytes' "Failed to
# load" warning, and, offline, kernels' "Skipping publisher trust check" for that one repository. Real bitsandbytes
# errors (level ERROR) and kernels' warnings about any other repository still show.
_BNB_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels._internals.hf_hub").addFilter(lambda record: _BNB_KERNEL_REPO not in record.getMessage())

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
