"""The reward plot (each series on its own axes, weighted vs raw labelled), the sample pictures (with HR, the true
degradation and the total reward) and their TensorBoard steps, which are those of the scalars of the same batch."""

import numpy as np
from PIL import Image

from vlcot_grpo.pictures import TILE, picture_lines, sample_picture, weighted_total
from vlcot_grpo.plots import reward_figure

HISTORY = [
    {"step": s, "reward": 1.5 + s, "rewards/format/mean": 1.0, "rewards/fidelity/mean": 0.1 * s,
     "vlcot/format_valid_rate": 0.99, "loss": 0.0}
    for s in (1, 2, 3)
] + [{"step": 3, "train_runtime": 1.0}]  # fmt: skip


def test_total_each_reward_and_the_format_rate_have_their_own_axes():
    fig = reward_figure(HISTORY, weights={"format": 1.0, "fidelity": 2.0})
    shown = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in shown]
    assert titles == ["weighted total (sum of weight x reward)", "fidelity: raw mean (weight 2)",
                      "format: raw mean (weight 1)", "format-valid rate"]  # fmt: skip
    assert all(len(ax.get_lines()) == 1 for ax in shown)
    total = shown[0].get_lines()[0]
    assert list(total.get_xdata()) == [1, 2, 3] and list(total.get_ydata()) == [2.5, 3.5, 4.5]


def test_sample_picture_shows_hr_true_degradation_and_total(photo):
    lr, hr = photo.resize((16, 16)), photo.resize((64, 64))
    stages = {"rough": photo.resize((16, 16)), "middle": None, "final": photo.resize((64, 64))}
    rewards = {"format": 1.0, "fidelity": 0.25, "understanding": None}
    total = weighted_total(rewards, {"format": 1.0, "fidelity": 2.0})
    assert total == 1.5  # the not-applicable reward is left out, as TRL sums
    picture = sample_picture(lr, stages, {"degradation": "light blur"}, rewards, hr, "heavy noise", total)
    assert picture.width == 5 * TILE  # LR | rough | middle | final | HR
    hr_panel = np.asarray(picture.crop((4 * TILE, 0, 5 * TILE, TILE)))
    assert np.array_equal(hr_panel, np.asarray(hr.resize((TILE, TILE), Image.Resampling.NEAREST)))
    lines = picture_lines({"degradation": "light blur"}, rewards, "heavy noise", total)
    assert lines == ["degradation: light blur", "true degradation: heavy noise",
                     "rewards (raw): format=1.000, fidelity=0.250, understanding=n/a",
                     "total reward (weighted sum): 1.500"]  # fmt: skip


def test_tensorboard_pictures_are_at_the_steps_of_their_scalars(tmp_path, monkeypatch, train_tiny_grpo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    out = train_tiny_grpo("--report_to", "tensorboard", "--image_log_steps", "1", "--max_steps", "2",
                          "--image_log_samples", "1")  # fmt: skip
    (log,) = {p.parent for p in out.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(log), size_guidance={"images": 0, "scalars": 0}).Reload()
    image_steps = sorted({e.step for tag in events.Tags()["images"] for e in events.Images(tag)})
    scalar_steps = sorted({e.step for e in events.Scalars("train/reward")})
    assert image_steps == scalar_steps == [1, 2]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step000001_sample0.png", "step000002_sample0.png"]
    assert (out / "rewards.png").stat().st_size > 1000
