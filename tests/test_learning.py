"""A short benchmarks/learning.py: does GRPO beat its own cold start on the held-out photos by more than the
seed-to-seed spread? (The full benchmark and its numbers: docs/benchmarks.md, "Does GRPO learn?".)"""

import importlib.util
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _learning():
    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "benchmarks" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interval_is_students_t():
    bench = _learning()
    mean, half = bench.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert bench.interval([5.0]) == (5.0, 0.0)


def test_merge_puts_seeds_run_apart_into_one_table(tmp_path):
    import json

    bench = _learning()
    for seed, total in ((0, 0.2), (1, 0.4)):
        means = {m: {"format": total / 2, "total": total} for m in bench.MODELS}
        run = {
            "seed": seed,
            "seconds": {"cold_start": 1.0, "grpo": 2.0, "sft_more": 2.0},
            "sft_more_epochs": 3,
            "means": means,
            "log_history": [{"step": 1, "reward": total, "rewards/format/mean": total / 2}],
        }
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        report = {"args": {"seeds": [seed], "grpo_steps": 60}, "runs": [run]}
        (folder / "learning.json").write_text(json.dumps(report))
    merged = bench.main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "all")])
    assert merged["args"]["seeds"] == [0, 1] and merged["args"]["grpo_steps"] == 60
    mean, half = merged["table"]["total"]["grpo"]
    assert mean == pytest.approx(0.3) and half == pytest.approx(12.706 * statistics.stdev([0.2, 0.4]) / 2**0.5)
    assert (tmp_path / "all" / "curves.png").stat().st_size > 0
    assert "0.300 ± " in (tmp_path / "all" / "learning.md").read_text()


@pytest.mark.slow
@pytest.mark.xfail(
    reason="measured 2026-12-03/04 in seven settings: GRPO does not beat its cold start on the held-out photos by "
    "more than the seed-to-seed spread (docs/benchmarks.md, 'Does GRPO learn?')",
    strict=False,  # an XPASS is reported: the day it passes, drop the mark
)
def test_grpo_beats_the_cold_start_on_heldout_photos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = _learning().main(["--seeds", "0", "1", "2", "--out", str(tmp_path / "learning"), "--grpo-steps", "6"])
    totals = {m: [run["means"][m]["total"] or 0.0 for run in report["runs"]] for m in ("cold_start", "grpo")}
    spread = max(statistics.stdev(values) for values in totals.values())
    gain = statistics.fmean(totals["grpo"]) - statistics.fmean(totals["cold_start"])
    assert gain > spread, (totals, spread)
