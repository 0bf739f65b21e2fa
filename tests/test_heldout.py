"""The demo's held-out split (never trained on) and the held-out evaluation the demo runs before and after GRPO."""

import math

import pytest
import torch
from PIL import Image

from vlcot_grpo import heldout
from vlcot_grpo.data.demo import build_demo_dataset, demo_annotations

SETTINGS = {
    "lr_size": 16,
    "stage_sizes": {"rough": [8, 8], "middle": [16, 16], "final": [32, 32]},
    "prompt": "Super-resolve <|image|>: name the degradation, then rough, middle and final images.",
    "sampling": {"max_new_tokens": 48, "temperature": 1.0, "image_temperature": 1.0, "guidance_scale": 1.0},
    "rewards": [
        {"name": "format", "weight": 1.0, "kwargs": {}},
        {"name": "understanding", "weight": 0.5, "kwargs": {}},
        {"name": "fidelity", "weight": 2.0, "kwargs": {}},
    ],
    "dataset": {"hr_size": 32, "seed": 0},
}


def test_heldout_split_is_disjoint_from_training_and_annotated(tmp_path):
    train, held = demo_annotations("train"), demo_annotations("heldout")
    assert len(train) == 7 and len(held) == 3
    assert not {e["name"] for e in train} & {e["name"] for e in held}
    assert not {e["loader"] for e in train} & {e["loader"] for e in held}
    assert all(e["tags"] and e["caption"] and e["licence"] for e in held)
    assert demo_annotations(None) == [*train, *held]
    rows = build_demo_dataset(hr_size=32, split="heldout", cache_dir=tmp_path)
    assert sorted(rows["source"]) == sorted(f"{e['name']}.png" for e in held)
    assert all(img.size == (32, 32) for img in rows["hr_image"])
    training = build_demo_dataset(hr_size=32, cache_dir=tmp_path)  # the default split is what trains
    assert not set(training["source"]) & set(rows["source"]) and len(training) == 7
    with pytest.raises(ValueError, match="demo split"):
        demo_annotations("test")


def test_heldout_rows_take_the_runs_prompt_and_sizes():
    rows = heldout.heldout_rows(SETTINGS)
    assert {row["prompt"] for row in rows} == {SETTINGS["prompt"]}
    assert all(row["hr_image"].size == (32, 32) for row in rows)


def test_evaluation_is_seeded_and_scored_per_chain(tiny_emu3, tmp_path):
    model, tokenizer, _ = tiny_emu3
    rows = heldout.heldout_rows(SETTINGS)[:2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = heldout.evaluate_heldout(model, tokenizer, rows, SETTINGS, samples=2, seed=5)
        again = heldout.evaluate_heldout(model, tokenizer, rows, SETTINGS, samples=2, seed=5)
        other = heldout.evaluate_heldout(model, tokenizer, rows, SETTINGS, samples=2, seed=6)
    finally:
        torch.set_num_threads(threads)
    texts = [p.texts for p in first.parses]
    assert texts == [p.texts for p in again.parses] and first.rewards == again.rewards
    assert [r["source"] for r in first.rows] == [rows[0]["source"]] * 2 + [rows[1]["source"]] * 2
    assert [p.texts for p in other.parses] != texts or first.total != other.total
    assert first.format_valid == [bool(p.complete) for p in first.parses]
    assert set(first.rewards) == {"format", "understanding", "fidelity"}
    for i in range(4):  # the total is the weighted sum of the applicable rewards, as TRL sums them
        parts = [(w, first.rewards[k][i]) for k, w in first.weights.items()]
        want = sum(w * v for w, v in parts if v is not None)
        assert math.isclose(first.total[i], want)
    means = first.means()
    assert means["format_valid_rate"] == sum(first.format_valid) / 4
    lines = heldout.comparison_lines(first, other)
    assert len(lines) == 1 + 3 + 2 and "→" in lines[1]
    paths = heldout.save_heldout_pictures(first, tmp_path / "pics")
    assert [p.stem for p in paths] == [r["source"].removesuffix(".png") for r in rows]
    assert Image.open(paths[0]).width == 5 * 192  # LR, three stages, HR
