"""Degradation reward: did the model name the right level (light / medium / heavy) for each pipeline step?"""

from __future__ import annotations

import json
from collections import Counter

from vlcot_grpo.data.levels import LEVELS, STEPS, parse_degradation_text

from .base import Reward, column, log_metric, stage_texts


class DegradationReward(Reward):
    """Fraction of the five steps (blur, downsample, noise, compression, upsample) whose predicted level equals the
    recorded one; the paper's example: 3 of 5 right -> 0.6.

    The prediction is the ``<degradation>`` text read by ``vlcot_grpo.data.levels.parse_degradation_text``; the
    truth is the ``degradation_levels`` column (step -> level, ``None`` = the step was not applied). A step the text
    does not name counts as predicted absent, so saying nothing about a step that was not applied is right.

    Scores and reasons:

    * missing or empty ``<degradation>`` text -> 0.0, counted in the log as ``degradation/missing``;
    * text in which no step can be read (only unread fragments) -> 0.0, counted as ``degradation/unreadable``;
    * text partly read (some fragments unread) -> scored on what was read, counted as ``degradation/partly_unread``;
    * no ``degradation_levels`` for the sample -> ``None`` (not applicable).

    Args:
        graded: when True, a wrong level earns partial credit by distance: ``1 - |a - b| / 2`` with light=0,
            medium=1, heavy=2 (medium for heavy earns 0.5, light for heavy earns 0); absent vs present earns 0.
    """

    name = "degradation"

    def __init__(self, graded: bool = False) -> None:
        super().__init__()
        self.graded = bool(graded)

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        n = len(completions)
        texts = [t["degradation"] for t in stage_texts(kwargs, n)]
        truths = column(kwargs, "degradation_levels", n)
        reasons: Counter[str] = Counter()
        step_credit: dict[str, list[float]] = {step: [] for step in STEPS}
        scores: list[float | None] = []
        for text, truth in zip(texts, truths):
            truth = recorded_levels(truth)
            if truth is None:
                scores.append(None)
                continue
            predicted, reason = self.read_prediction(text)
            if reason:
                reasons[reason] += 1
            if predicted is None:
                scores.append(0.0)
                continue
            credits = {step: self.step_credit(predicted.get(step), truth.get(step)) for step in STEPS}
            for step, credit in credits.items():
                step_credit[step].append(credit)
            scores.append(sum(credits.values()) / len(STEPS))
        for reason in ("missing", "unreadable", "partly_unread"):
            log_metric(kwargs, f"degradation/{reason}", reasons[reason])
        for step, credits in step_credit.items():
            if credits:
                log_metric(kwargs, f"degradation/{step}_accuracy", sum(credits) / len(credits))
        return scores

    @staticmethod
    def read_prediction(text: str | None) -> tuple[dict[str, str | None] | None, str | None]:
        """``(levels, reason)``: levels read from the text (``None`` if there are none to score) and why not."""
        if not text or not text.strip():
            return None, "missing"
        parsed = parse_degradation_text(text)
        named_any = any(level is not None for level in parsed.levels.values())
        if parsed.unread and not named_any:
            return None, "unreadable"
        return parsed.levels, ("partly_unread" if parsed.unread else None)

    def step_credit(self, predicted: str | None, truth: str | None) -> float:
        if predicted == truth:
            return 1.0
        if not self.graded or predicted is None or truth is None:
            return 0.0
        return 1.0 - abs(LEVELS.index(predicted) - LEVELS.index(truth)) / 2.0


def recorded_levels(value) -> dict[str, str | None] | None:
    """The ``degradation_levels`` of one sample as a dict step -> level or None; accepts a dict or a JSON string."""
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise TypeError(f"degradation_levels must be a dict of step -> level, got {type(value).__name__}")
    unknown = sorted(set(value) - set(STEPS))
    if unknown:
        raise ValueError(f"degradation_levels has unknown steps {unknown}; expected some of {STEPS}")
    for step, level in value.items():
        if level is not None and level not in LEVELS:
            raise ValueError(f"degradation_levels[{step!r}] = {level!r} is not one of {LEVELS} or None")
    return {step: value.get(step) for step in STEPS}
