"""What every built-in reward shares: a name for the logs and tidy access to the keyword arguments it receives.

The trainer calls each reward as ``reward(prompts=..., completions=..., completion_ids=..., **columns)``, where every
column is a list aligned with the completions (see ``docs/rewards.md`` for the full list). The helpers here read a
column whether or not the trainer passed it, so a reward also works when called by hand in a notebook or a test.
"""

from __future__ import annotations

import math
from typing import Any

from vlcot_grpo.vlcot import STAGES, TEXT_BLOCKS


class Reward:
    """Base class of the built-in rewards.

    Subclasses set ``name`` (the registry name, also what TRL shows in its logs, since TRL reads ``__name__``) and
    implement ``__call__(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]``.
    """

    name: str = "reward"

    def __init__(self) -> None:
        # TRL names a reward by ``reward_func.__name__``; an instance has none unless we give it one.
        self.__name__ = self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r})"


def column(kwargs: dict[str, Any], key: str, n: int) -> list[Any]:
    """The column ``key`` as a list of ``n`` values; all ``None`` when the trainer did not pass it."""
    values = kwargs.get(key)
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
    return values


def require_any(kwargs: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Fail clearly when none of ``keys`` was passed (rather than scoring every completion as if it were empty)."""
    if not any(kwargs.get(key) is not None for key in keys):
        raise ValueError(
            f"this reward needs the keyword argument {' or '.join(map(repr, keys))} (one value per completion); "
            "the VLCoT trainer passes it, see docs/rewards.md"
        )


def stage_texts(kwargs: dict[str, Any], n: int) -> list[dict[str, str | None]]:
    """Per completion: text block name -> text (``None`` where the block is missing or unclosed).

    Read from ``stage_texts`` when given, else from the parses in ``vlcot``.
    """
    require_any(kwargs, ("stage_texts", "vlcot"))
    texts = column(kwargs, "stage_texts", n)
    parses = column(kwargs, "vlcot", n)
    out = []
    for given, parse in zip(texts, parses):
        if given is None and parse is not None:
            given = parse.texts
        out.append({block: (given or {}).get(block) for block in TEXT_BLOCKS})
    return out


def stage_images(kwargs: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Per completion: stage (``rough``/``middle``/``final``) -> decoded PIL image, ``None`` where missing/malformed.

    Read from ``stage_images`` when given, else from the parses in ``vlcot``. An image whose block was never closed
    (e.g. no ``</final_image>``) counts as missing, like an unclosed text block: the model did not finish it.
    """
    require_any(kwargs, ("stage_images", "vlcot"))
    images = column(kwargs, "stage_images", n)
    parses = column(kwargs, "vlcot", n)
    out = []
    for given, parse in zip(images, parses):
        if given is None and parse is not None:
            given = parse.images
        stages = {stage: (given or {}).get(stage) for stage in STAGES}
        if parse is not None:
            for stage in STAGES:
                block = parse.blocks.get(f"{stage}_image")
                if block is not None and not block.closed:
                    stages[stage] = None
        out.append(stages)
    return out


def log_metric(kwargs: dict[str, Any], name: str, value: float) -> None:
    """Log a scalar through the trainer's ``log_metric`` when there is one (there is none outside the trainer)."""
    logger = kwargs.get("log_metric")
    if callable(logger):
        logger(name, float(value))


def mean(values: list[float | None]) -> float | None:
    """Mean of the values that are not ``None``; ``None`` when there are none."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None
