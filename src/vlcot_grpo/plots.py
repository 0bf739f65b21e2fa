"""A PNG of the rewards per step, from a trainer's ``log_history``."""

from __future__ import annotations

from pathlib import Path


def plot_rewards(log_history: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    keys = sorted({k for row in log_history for k in row if k.startswith("rewards/") and k.endswith("/mean")})
    keys += [k for k in ("reward", "vlcot/format_valid_rate") if any(k in row for row in log_history)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(row["step"], row[key]) for row in log_history if key in row and "step" in row]
        if points:
            ax.plot(*zip(*points), marker="o", label=key.removeprefix("rewards/").removesuffix("/mean"))
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
