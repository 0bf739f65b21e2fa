"""Does GRPO learn? Cold start → GRPO on the demo's training photos, against two baselines, all scored on the
held-out photos (never trained on) with the same seeds and the GRPO run's rewards.

    python benchmarks/learning.py --seeds 0 1 2 --out outputs/learning

Per seed: (1) a cold start, the demo's SFT recipe but ``--sft-epochs`` (default 40) on ``--sft-degradations``
(default 1) degradations of each photo, so that it leaves room to improve; (2) GRPO from it with the demo's
recipe (rewards format, degradation, understanding, fidelity); (3) the cold start trained on further by SFT for the
wall-clock time GRPO took (epochs from the cold start's own seconds per row and epoch). GRPO and more SFT train on
the cold start's inputs, or with ``--fresh-degradations`` n on n new degradations of each photo that the cold start
never saw (the held-out photos stay unseen by all three). Each of the three models writes ``--samples`` chains per
held-out photo, generated with the same seed for all three, scored by the GRPO run's rewards
(``vlcot_grpo.heldout``). Reported: held-out mean ± 95 % interval over seeds (Student t) of every reward, of the
weighted total and of the format-valid rate; GRPO's reward curves per step (``curves.png``, one line per seed);
``learning.json`` and ``learning.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SFT_RECIPE = ROOT / "recipes" / "tiny-emu3" / "sft" / "config_demo.yaml"
GRPO_RECIPE = ROOT / "recipes" / "tiny-emu3" / "grpo" / "config_demo.yaml"
MODELS = ("cold_start", "sft_more", "grpo")
#: two-sided 95 % Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % interval (Student t over the seeds; 0 for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def _data_flags(demo_seed: int, copies: int) -> list[str]:
    return ["--demo_seed", str(demo_seed), "--demo_degradations_per_image", str(copies)]


def _sft(model: Path, out: Path, epochs: int, seed: int, extra: list[str]) -> float:
    from vlcot_grpo import sft

    start = time.perf_counter()
    sft.main([
        "--config", str(SFT_RECIPE), "--model_name_or_path", str(model), "--output_dir", str(out),
        "--num_train_epochs", str(epochs), "--seed", str(seed), "--format_check_samples", "0", *extra,
    ])  # fmt: skip
    return time.perf_counter() - start


def run_seed(seed: int, root: Path, args) -> dict:
    from vlcot_grpo import grpo
    from vlcot_grpo.saved_settings import read_settings

    folder = root / f"seed{seed}"
    base = root / "model"  # the tiny base, built once by the first cold start (build_tiny_model in the recipe)
    cold = folder / "cold_start"
    cold_data = _data_flags(0, args.sft_degradations)
    # GRPO and more SFT: the cold start's inputs, or fresh degradations of the same photos (demo seeds after the
    # cold start's, so no LR input is one the cold start saw)
    later = args.fresh_degradations or args.sft_degradations
    later_data = _data_flags(args.sft_degradations, later) if args.fresh_degradations else cold_data
    sft_seconds = _sft(base, cold, args.sft_epochs, seed, cold_data)
    start = time.perf_counter()
    out = grpo.main([
        "--config", str(GRPO_RECIPE), "--model_name_or_path", str(cold), "--output_dir", str(folder / "grpo"),
        "--max_steps", str(args.grpo_steps), "--seed", str(seed), "--report_to", "none", "--image_log_steps", "0",
        "--save_strategy", "steps", "--save_steps", str(args.grpo_steps), "--save_total_limit", "1",
        "--build_tiny_model", "false", "--learning_rate", str(args.grpo_lr),
        "--num_generations", str(args.generations), "--per_device_train_batch_size", str(args.generations),
        "--gradient_accumulation_steps", str(args.prompts_per_step),
        "--image_codes_in_loss", str(not args.text_loss_only).lower(),
        *later_data,
        *(["--rewards", *args.rewards, "--reward_weights", *["1"] * len(args.rewards)] if args.rewards else []),
    ])  # fmt: skip
    grpo_seconds = time.perf_counter() - start
    # the same wall-clock time of further SFT, at the cold start's measured seconds per row and epoch
    seconds_per_epoch = sft_seconds / args.sft_epochs * later / args.sft_degradations
    more_epochs = max(1, round(grpo_seconds / seconds_per_epoch))
    more_seconds = _sft(cold, folder / "sft_more", more_epochs, seed, ["--build_tiny_model", "false", *later_data])
    state = json.loads(next(Path(out).glob("checkpoint-*/trainer_state.json")).read_text())
    return {
        "seed": seed,
        "seconds": {"cold_start": sft_seconds, "grpo": grpo_seconds, "sft_more": more_seconds},
        "sft_more_epochs": more_epochs,
        "means": score_heldout(folder, seed, args),
        "log_history": state["log_history"],
        "weights": {r["name"]: r["weight"] for r in read_settings(out)["rewards"]},
    }


def score_heldout(folder: Path, seed: int, args) -> dict:
    """The seed's three saved models on the held-out photos, ``args.samples`` chains per photo and model with the
    same sampling seed, scored by the GRPO run's rewards; model -> mean of each reward (pictures and heldout.json
    are written into ``folder``)."""
    from vlcot_grpo import heldout
    from vlcot_grpo.loading import load_pretrained
    from vlcot_grpo.saved_settings import read_settings

    settings = read_settings(folder / "grpo")
    rows = heldout.heldout_rows(settings)
    rewards = heldout.run_rewards(settings)
    results = {}
    for name in MODELS:
        model, tokenizer = load_pretrained(str(folder / name), dtype="float32")
        results[name] = heldout.evaluate_heldout(
            model, tokenizer, rows, settings, args.samples, args.eval_seed + seed, rewards
        )
        heldout.save_heldout_pictures(results[name], folder / "heldout" / name)
    heldout.write_summary(folder / "heldout.json", results)
    return {name: r.means() for name, r in results.items()}


def summarise(runs: list[dict]) -> dict:
    """metric -> model -> (mean, 95 % half-width) over seeds; a metric missing in a seed (n/a) is left out there."""
    metrics = list(runs[0]["means"]["grpo"])
    table = {}
    for metric in metrics:
        table[metric] = {}
        for model in MODELS:
            values = [r["means"][model][metric] for r in runs if r["means"][model][metric] is not None]
            table[metric][model] = interval(values) if values else None
    return table


def markdown(table: dict, runs: list[dict]) -> str:
    def cell(value):
        return "n/a" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"

    lines = ["| held-out | cold start | cold start + SFT (same time) | cold start + GRPO |", "|---|---|---|---|"]
    for metric, row in table.items():
        lines.append(f"| {metric} | " + " | ".join(cell(row[m]) for m in MODELS) + " |")
    per_seed = ", ".join(
        f"seed {r['seed']}: SFT {r['seconds']['cold_start']:.0f} s, GRPO {r['seconds']['grpo']:.0f} s, "
        f"SFT-more {r['seconds']['sft_more']:.0f} s ({r['sft_more_epochs']} epochs)"
        for r in runs
    )
    return "\n".join(lines) + f"\n\nWall-clock per seed: {per_seed}.\n"


def plot_curves(runs: list[dict], path: Path) -> Path:
    """GRPO's training reward curves per step: total, each reward's raw mean, format-valid rate; a line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["reward"] + sorted(
        {k for r in runs for row in r["log_history"] for k in row if k.startswith("rewards/") and k.endswith("/mean")}
    )
    keys.append("vlcot/format_valid_rate")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for r in runs:
            points = [(row["step"], row[key]) for row in r["log_history"] if row.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=f"seed {r['seed']}")
        ax.set_title(key.removeprefix("rewards/").removesuffix("/mean"), fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="outputs/learning")
    parser.add_argument(
        "--sft-epochs", type=int, default=40, help="Cold-start epochs (the demo: 20, on 4 degradations)."
    )
    parser.add_argument("--grpo-steps", type=int, default=12, help="GRPO steps (the demo's 12).")
    parser.add_argument("--grpo-lr", type=float, default=2e-4, help="GRPO (LoRA) learning rate (the demo's 2e-4).")
    parser.add_argument(
        "--generations", type=int, default=4, help="Rollouts per photo and GRPO step, one photo a step (the demo's 4)."
    )
    parser.add_argument(
        "--prompts-per-step",
        type=int,
        default=1,
        help="Photos (groups of rollouts) per GRPO optimiser step, by gradient accumulation (the demo: 1; the "
        "paper: 6, one per GPU).",
    )
    parser.add_argument(
        "--text-loss-only", action="store_true", help="GRPO trains the text tokens only (image_codes_in_loss: false)."
    )
    parser.add_argument(
        "--rewards", nargs="+", default=None, help="GRPO's rewards (default: the demo recipe's four, weight 1 each)."
    )
    parser.add_argument(
        "--sft-degradations", type=int, default=1, help="Degraded copies of each photo in the cold start (demo: 4)."
    )
    parser.add_argument(
        "--fresh-degradations",
        type=int,
        default=0,
        help="GRPO and more SFT train on this many new degradations of each photo, none the cold start saw "
        "(0: on the cold start's own inputs).",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=16,
        help="Held-out chains per photo and model (16 × 3 photos: a format rate near 0.5 has a standard error of "
        "about 0.07).",
    )
    parser.add_argument("--eval-seed", type=int, default=1000, help="Held-out sampling seed (plus the run's seed).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="Train nothing: merge the seeds of earlier runs (their learning.json, e.g. one process per seed "
        "run side by side) into one table in --out.",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="With --merge: score each seed's saved models on the held-out photos again (--samples, --eval-seed) "
        "instead of reusing the means they were run with.",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    settings = vars(args)
    if args.merge:
        reports = [json.loads((Path(folder) / "learning.json").read_text()) for folder in args.merge]
        runs = []
        for folder, report in zip(args.merge, reports):
            for run in report["runs"]:
                if args.rescore:
                    run["means"] = score_heldout(Path(folder) / f"seed{run['seed']}", run["seed"], args)
                runs.append(run)
        settings = {**reports[0]["args"], "seeds": [run["seed"] for run in runs], "merged_from": args.merge}
        if args.rescore:
            settings.update(samples=args.samples, eval_seed=args.eval_seed)
    else:
        runs = [run_seed(seed, root, args) for seed in args.seeds]
    table = summarise(runs)
    text = markdown(table, runs)
    curves = plot_curves(runs, root / "curves.png")
    report = {"args": settings, "table": table, "runs": runs, "seconds": time.perf_counter() - start}
    (root / "learning.json").write_text(json.dumps(report, indent=2) + "\n")
    (root / "learning.md").write_text(text)
    print(text)
    print(f"[learning] {time.perf_counter() - start:.0f} s; curves: {curves}; {root / 'learning.json'}")
    return report


if __name__ == "__main__":
    main()
