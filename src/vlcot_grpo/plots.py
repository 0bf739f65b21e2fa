"""A PNG of the rewards per step, from a trainer's ``log_history``: the weighted total, each reward's raw mean and
the format-valid rate, each on its own axes (their scales differ: a sum of weighted rewards, values in [0, 1])."""

from __future__ import annotations

from pathlib import Path


def _series(log_history: list[dict], key: str) -> list[tuple[float, float]]:
    return [(row["step"], row[key]) for row in log_history if row.get(key) is not None and "step" in row]


def reward_figure(log_history: list[dict], weights: dict[str, float] | None = None):
    """The matplotlib figure: one panel for TRL's ``reward`` (the weighted sum), one per ``rewards/<name>/mean``
    (the raw, unweighted mean, its weight in the title) and one for ``vlcot/format_valid_rate``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = sorted({k for row in log_history for k in row if k.startswith("rewards/") and k.endswith("/mean")})
    panels = [("reward", "weighted total (sum of weight x reward)")]
    for key in names:
        name = key.removeprefix("rewards/").removesuffix("/mean")
        weight = (weights or {}).get(name)
        panels.append((key, f"{name}: raw mean" + (f" (weight {weight:g})" if weight is not None else "")))
    panels.append(("vlcot/format_valid_rate", "format-valid rate"))
    panels = [(key, title) for key, title in panels if _series(log_history, key)]
    columns = min(3, max(1, len(panels)))
    rows = -(-len(panels) // columns) if panels else 1
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(*zip(*_series(log_history, key)), marker="o", label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def plot_rewards(log_history: list[dict], path: str | Path, weights: dict[str, float] | None = None) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = reward_figure(log_history, weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
