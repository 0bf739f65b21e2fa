"""Sample pictures: LR | rough | middle | final | HR side by side, with the chain's texts, the true degradation and
the rewards (each raw, and the weighted total) underneath."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from vlcot_grpo.vlcot import STAGES

TILE = 192  # every panel is shown at this size, nearest-neighbour, so tiny images stay visible


def _score(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def picture_lines(texts: dict, rewards: dict, true_degradation: str | None, total_reward: float | None) -> list[str]:
    """The text under a sample picture: the chain's blocks, the true degradation, raw rewards, weighted total."""
    lines = [f"{k}: {v}" for k, v in texts.items() if v]
    if true_degradation:
        lines.append(f"true degradation: {true_degradation}")
    if rewards:
        lines.append("rewards (raw): " + ", ".join(f"{k}={_score(v)}" for k, v in rewards.items()))
    if total_reward is not None:
        lines.append(f"total reward (weighted sum): {total_reward:.3f}")
    return lines


def sample_picture(
    lr_image,
    stage_images: dict,
    texts: dict,
    rewards: dict[str, float | None],
    hr_image=None,
    true_degradation: str | None = None,
    total_reward: float | None = None,
) -> Image.Image:
    """One picture of a chain; ``hr_image``, ``true_degradation`` and ``total_reward`` are shown when given."""
    panels = [("LR", lr_image)] + [(s, stage_images.get(s)) for s in STAGES]
    if hr_image is not None:
        panels.append(("HR", hr_image))
    lines = picture_lines(texts, rewards, true_degradation, total_reward)

    wrapped = [w for line in lines for w in textwrap.wrap(line, width=100)[:3]]
    canvas = Image.new("RGB", (TILE * len(panels), TILE + 16 + 12 * len(wrapped) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, image) in enumerate(panels):
        if image is not None:
            canvas.paste(image.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST), (i * TILE, 0))
        else:
            draw.rectangle([i * TILE, 0, (i + 1) * TILE - 1, TILE - 1], outline="red")
            draw.text((i * TILE + 8, TILE // 2), "missing / malformed", fill="red")
        draw.text((i * TILE + 4, TILE + 2), label, fill="black")
    for j, line in enumerate(wrapped):
        draw.text((4, TILE + 16 + 12 * j), line, fill="black")
    return canvas


def weighted_total(rewards: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """As TRL sums them: each reward times its weight, a not-applicable (None/NaN) one left out."""
    import math

    values = [weights.get(k, 1.0) * v for k, v in rewards.items() if v is not None and not math.isnan(v)]
    return sum(values) if values else None


def log_pictures(
    trainer, inputs: list[dict], rewards: dict[str, list[float]], folder: Path, step: int, weights=None
) -> list[Path]:
    """Save one picture per sample under ``folder`` and send them to TensorBoard / W&B when those are active, at
    ``step``: the step the scalars of this batch are logged at."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, pictures = [], []
    for i, row in enumerate(inputs):
        sample_rewards = {name: values[i] for name, values in rewards.items() if i < len(values)}
        picture = sample_picture(
            row["lr_image"],
            row.get("stage_images", {}),
            row.get("stage_texts", {}),
            sample_rewards,
            hr_image=row.get("hr_image"),
            true_degradation=row.get("degradation_text"),
            total_reward=weighted_total(sample_rewards, weights or {}),
        )
        path = folder / f"step{step:06d}_sample{i}.png"
        picture.save(path)
        paths.append(path)
        pictures.append(picture)
    _to_tensorboard(trainer, pictures, step)
    _to_wandb(pictures, step)
    return paths


def _to_tensorboard(trainer, pictures, step):
    import numpy as np

    for callback in trainer.callback_handler.callbacks:
        writer = getattr(callback, "tb_writer", None)
        if writer is not None:
            for i, picture in enumerate(pictures):
                writer.add_image(f"samples/{i}", np.asarray(picture), step, dataformats="HWC")


def _to_wandb(pictures, step):
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.log({"samples": [wandb.Image(p) for p in pictures]}, step=step)
