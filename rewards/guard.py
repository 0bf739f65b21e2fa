"""The fault guard every loaded reward is wrapped in: turn a reward's failure into an error a person can act on.

* The reward raises -> it is re-run one sample at a time to find the first sample that fails, and a
  ``RewardError`` names the reward and that sample's index (the original exception is chained).
* It returns NaN or +-inf for a sample -> that value becomes ``None`` (TRL's "not applicable"), the count is logged
  as ``rewards/<name>/nan_count`` and a warning is issued.
* It returns the wrong number of values, or a value that is not a number -> ``RewardError`` saying so.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any


class RewardError(RuntimeError):
    """A reward failed; the message names the reward and, where known, the sample."""


def _no_log(name: str, value: float) -> None:
    pass


class GuardedReward:
    """Calls ``reward`` and checks what it returns (see the module docstring). Exposes the same ``__name__``.

    Args:
        reward: any callable with TRL's reward signature.
        name: name used in errors and logs (and by TRL); default: ``reward.__name__``.
    """

    def __init__(self, reward, name: str | None = None) -> None:
        self.reward = reward
        self.__name__ = name or getattr(reward, "__name__", type(reward).__name__)

    def __repr__(self) -> str:
        return f"GuardedReward({self.reward!r}, name={self.__name__!r})"

    def prepare(self, device=None) -> None:
        """Forwarded to the reward's own ``prepare(device)`` when it has one (loads models on the device)."""
        prepare = getattr(self.reward, "prepare", None)
        if callable(prepare):
            prepare(device)

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        n = len(completions)
        try:
            values = self.reward(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        except Exception as err:
            index = self._first_failing_sample(prompts, completions, completion_ids, kwargs)
            if index is not None:
                where = f"on sample {index}"
            else:  # no sample fails alone: name the one whose joining the batch makes it fail
                joined = self._first_failing_prefix(prompts, completions, completion_ids, kwargs)
                where = f"on a batch of {n} (but on no single sample)"
                if joined is not None:
                    where += f"; it first fails when sample {joined} joins samples 0-{joined - 1}"
            raise RewardError(f"reward {self.__name__!r} raised {where}: {type(err).__name__}: {err}") from err
        return self._checked(values, n, kwargs)

    def _checked(self, values, n: int, kwargs: dict[str, Any]) -> list[float | None]:
        if hasattr(values, "tolist"):  # a tensor or an array
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            raise RewardError(
                f"reward {self.__name__!r} returned {type(values).__name__}, expected a list of {n} floats"
            )
        if len(values) != n:
            raise RewardError(
                f"reward {self.__name__!r} returned {len(values)} values for {n} completions (expected {n}, one per "
                "completion)"
            )
        out: list[float | None] = []
        not_finite = 0
        for i, value in enumerate(values):
            if value is None:
                out.append(None)
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise RewardError(
                    f"reward {self.__name__!r} returned {value!r} ({type(value).__name__}) for sample {i}; "
                    "expected a float or None"
                )
            value = float(value)
            if math.isfinite(value):
                out.append(value)
            else:
                not_finite += 1
                out.append(None)
        if not_finite:
            warnings.warn(
                f"reward {self.__name__!r} returned NaN/inf for {not_finite} of {n} completions; scored as None",
                RuntimeWarning,
                stacklevel=2,
            )
        logger = kwargs.get("log_metric")
        if callable(logger):
            logger(f"rewards/{self.__name__}/nan_count", float(not_finite))
        return out

    def _first_failing_sample(self, prompts, completions, completion_ids, kwargs) -> int | None:
        """Index of the first sample on which the reward raises when called alone; ``None`` if none does."""
        n = len(completions)
        return next(
            (i for i in range(n) if self._raises(slice(i, i + 1), prompts, completions, completion_ids, kwargs)), None
        )

    def _first_failing_prefix(self, prompts, completions, completion_ids, kwargs) -> int | None:
        """The first ``i`` such that samples 0..i together make the reward raise (a batch-only failure)."""
        n = len(completions)
        return next(
            (i for i in range(1, n) if self._raises(slice(0, i + 1), prompts, completions, completion_ids, kwargs)),
            None,
        )

    def _raises(self, rows: slice, prompts, completions, completion_ids, kwargs) -> bool:
        n = len(completions)
        part = {key: _pick(value, rows, n) for key, value in kwargs.items()}
        part["log_metric"] = _no_log  # the diagnosis must not pollute the training logs
        try:
            self.reward(
                prompts=_pick(prompts, rows, n),
                completions=_pick(completions, rows, n),
                completion_ids=_pick(completion_ids, rows, n),
                **part,
            )
        except Exception:
            return True
        return False


def _pick(value, rows: slice, n: int):
    """``rows`` of a per-sample column (a list, tuple, tensor or array of length ``n``); anything else unchanged."""
    if isinstance(value, (list, tuple)) and len(value) == n:
        return list(value[rows])
    if hasattr(value, "shape") and getattr(value, "ndim", 0) >= 1 and len(value) == n:
        return value[rows]
    return value


def guard_reward(reward, name: str | None = None) -> GuardedReward:
    """Wrap ``reward`` in the fault guard (idempotent: a guarded reward is returned re-named, not wrapped twice)."""
    if isinstance(reward, GuardedReward):
        return GuardedReward(reward.reward, name or reward.__name__)
    return GuardedReward(reward, name)
