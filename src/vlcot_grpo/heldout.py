"""Held-out evaluation: chains on photos that no training step saw, scored by the run's own rewards.

The demo (and ``benchmarks/learning.py``) evaluates the cold-start model and the GRPO model here with the same
seeds, the same prompt, sizes and sampling settings (read from the GRPO run's ``vlcot_settings.json``), so that
before → after compares models and nothing else. The held-out photos are the demo data's ``heldout`` split
(``vlcot_grpo.data.demo``); their degradations depend on the dataset seed and each photo's content only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlcot_grpo.vlcot import STAGES


@dataclass
class HeldoutResult:
    """Per reward, the raw value of every chain (``None``: not applicable); the weighted total and format validity
    per chain; the chains' rows (which photo each came from) and parses, for pictures."""

    rewards: dict[str, list[float | None]]
    weights: dict[str, float]
    total: list[float | None]
    format_valid: list[bool]
    sources: list[str]
    parses: list = field(repr=False, default_factory=list)
    rows: list = field(repr=False, default_factory=list)

    def means(self) -> dict[str, float | None]:
        """Mean of each reward over the chains where it applies, of the total and the format-valid rate."""
        out = {name: _mean(values) for name, values in self.rewards.items()}
        out["total"] = _mean(self.total)
        out["format_valid_rate"] = sum(self.format_valid) / len(self.format_valid)
        return out


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def rollout_config(settings: dict):
    """The GRPO run's sampling settings (``vlcot_settings.json``) as a ``RolloutConfig``."""
    from vlcot_grpo.rollout import RolloutConfig

    sampling = settings.get("sampling", {})
    return RolloutConfig(
        stage_sizes={s: tuple(settings["stage_sizes"][s]) for s in STAGES},
        max_new_tokens=sampling.get("max_new_tokens", 1024),
        text_temperature=sampling.get("temperature", 1.0),
        text_top_k=sampling.get("top_k") or 0,
        text_top_p=sampling.get("top_p", 1.0),
        text_min_p=sampling.get("min_p") or 0.0,
        image_temperature=sampling.get("image_temperature", 1.0),
        image_top_k=sampling.get("image_top_k", 0),
        guidance_scale=sampling.get("guidance_scale", 1.0),
        engine="reference",  # the same engine for both models, whatever device
    )


def heldout_rows(settings: dict, split: str = "heldout") -> list[dict]:
    """The demo's ``split`` rows at the run's HR size and degradation seed, with the run's prompt."""
    from vlcot_grpo.data.demo import build_demo_dataset

    data = settings.get("dataset", {})
    rows = [
        dict(row) for row in build_demo_dataset(hr_size=data.get("hr_size", 64), seed=data.get("seed", 0), split=split)
    ]
    if settings.get("prompt"):
        for row in rows:
            row["prompt"] = settings["prompt"]
    return rows


def run_rewards(settings: dict):
    """The run's rewards (names, weights, kwargs as recorded), built as the GRPO script builds them."""
    from vlcot_grpo.rewards import load_rewards

    funcs, weights = load_rewards(settings["rewards"])  # recorded as load_rewards specs (saved_settings)
    return funcs, {f.__name__: w for f, w in zip(funcs, weights)}


@torch.no_grad()
def evaluate_heldout(
    model, tokenizer, rows: list[dict], settings: dict, samples: int = 4, seed: int = 0, rewards=None
) -> HeldoutResult:
    """``samples`` chains per row, sampled with a generator seeded by ``seed`` (so two models see the same random
    stream), scored by the run's rewards as the trainer scores them."""
    from vlcot_grpo.models import load_backend
    from vlcot_grpo.pictures import weighted_total
    from vlcot_grpo.rollout import RolloutEngine
    from vlcot_grpo.vlcot import encode_prompt, parse_completions

    funcs, weights = rewards or run_rewards(settings)
    backend = load_backend(model, tokenizer)
    config = rollout_config(settings)
    lr_size = settings["lr_size"]
    was_training = model.training
    model.eval()
    try:
        prompts = [encode_prompt(backend, row["lr_image"], (lr_size, lr_size), row["prompt"]) for row in rows]
        generator = torch.Generator(device=model.device).manual_seed(seed)
        batch = RolloutEngine(model, backend, config).generate(prompts, samples, generator)
    finally:
        model.train(was_training)
    grids = {s: backend.grid_for(*config.stage_sizes[s]) for s in STAGES}
    parses = parse_completions(backend, batch.completion_ids, grids)
    repeated = [row for row in rows for _ in range(samples)]  # the engine returns each prompt's samples together
    columns = {key: [row[key] for row in repeated] for key in repeated[0]}
    columns.pop("prompt", None)
    prompt_texts = [row["prompt"] for row in repeated]
    completions = tokenizer.batch_decode(batch.completion_ids, skip_special_tokens=True)
    scores = {}
    for func in funcs:
        values = func(
            prompts=prompt_texts,
            completions=completions,
            completion_ids=batch.completion_ids,
            vlcot=parses,
            stage_texts=[p.texts for p in parses],
            stage_images=[p.images for p in parses],
            **columns,
        )
        scores[func.__name__] = [None if v is None or math.isnan(v) else float(v) for v in values]
    totals = [weighted_total({k: v[i] for k, v in scores.items()}, weights) for i in range(len(parses))]
    return HeldoutResult(
        rewards=scores,
        weights=weights,
        total=totals,
        format_valid=[bool(p.complete) for p in parses],
        sources=[row["source"] for row in repeated],
        parses=parses,
        rows=repeated,
    )


def comparison_lines(before: HeldoutResult, after: HeldoutResult, labels=("cold start", "GRPO")) -> list[str]:
    """Per reward (raw mean), the weighted total and the format-valid rate: before → after."""
    a, b = before.means(), after.means()

    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    width = max(len(k) for k in a)
    lines = [f"{'':{width}}  {labels[0]} → {labels[1]}"]
    for key in a:
        change = "" if a[key] is None or b[key] is None else f"  ({b[key] - a[key]:+.3f})"
        lines.append(f"{key:{width}}  {fmt(a[key])} → {fmt(b[key])}{change}")
    return lines


def save_heldout_pictures(result: HeldoutResult, folder: str | Path) -> list[Path]:
    """One picture per held-out photo (its first chain): LR | rough | middle | final | HR, the chain's texts, the
    true degradation, each reward and the weighted total."""
    from vlcot_grpo.pictures import sample_picture

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, seen = [], set()
    for i, (row, parse) in enumerate(zip(result.rows, result.parses)):
        if row["source"] in seen:
            continue
        seen.add(row["source"])
        picture = sample_picture(
            row["lr_image"],
            parse.images,
            parse.texts,
            {name: values[i] for name, values in result.rewards.items()},
            hr_image=row.get("hr_image"),
            true_degradation=row.get("degradation_text"),
            total_reward=result.total[i],
        )
        path = folder / f"{Path(row['source']).stem}.png"
        picture.save(path)
        paths.append(path)
    return paths


def write_summary(path: str | Path, results: dict[str, HeldoutResult], extra: dict | None = None) -> Path:
    """The means and every chain's values of each evaluated model, as JSON."""
    body = {
        name: {
            "means": r.means(),
            "rewards": r.rewards,
            "total": r.total,
            "format_valid": r.format_valid,
            "sources": r.sources,
        }
        for name, r in results.items()
    }
    path = Path(path)
    path.write_text(json.dumps({**(extra or {}), "models": body}, indent=2) + "\n")
    return path
