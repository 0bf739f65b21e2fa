"""`vlcot-grpo evaluate` accounts for every pair, pins the paper's metric variants and explains missing weights."""

import csv
import json

import pyiqa
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from vlcot_grpo.cli import main as cli
from vlcot_grpo.rewards.iqa_weights import MetricUnavailableError


def _noisy(image, seed):
    t = to_tensor(image) + 0.05 * torch.randn(
        3, image.size[1], image.size[0], generator=torch.Generator().manual_seed(seed)
    )
    return Image.fromarray((t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


@pytest.fixture
def folders(photo, tmp_path):
    """a, b: good pairs; c: unreadable SR; d: SR of another size; e: HR only; f: SR only; a_chain: upscale's picture."""
    sr, hr = tmp_path / "sr", tmp_path / "hr"
    sr.mkdir(), hr.mkdir()
    for i, name in enumerate("abcde"):
        photo.rotate(30 * i).resize((64, 64)).save(hr / f"{name}.png")
    for i, name in enumerate("ab"):
        _noisy(photo.rotate(30 * i).resize((64, 64)), i).save(sr / f"{name}.png")
    (sr / "c.png").write_bytes(b"not a png")
    photo.rotate(90).resize((48, 48)).save(sr / "d.png")
    photo.resize((64, 64)).save(sr / "f.png")
    photo.resize((200, 64)).save(sr / "a_chain.png")
    return sr, hr


def test_every_pair_is_accounted_for_and_written_per_image(folders, tmp_path, capsys):
    sr, hr = folders
    out = tmp_path / "scores.json"
    argv = ["evaluate", "--sr-dir", str(sr), "--hr-dir", str(hr), "--out", str(out), "--device", "cpu"]
    assert cli(argv) == 0
    printed = capsys.readouterr()
    assert "scored 2 of 6 pairs" in printed.out
    result = json.loads(out.read_text())
    status = {row["name"]: row["status"] for row in result["per_image"]}
    assert status == {"a": "scored", "b": "scored", "c": "unreadable", "d": "size_mismatch", "e": "missing_sr",
                      "f": "missing_hr"}  # fmt: skip
    assert result["counts"]["scored"] == 2 and "SR 48x48, HR 64x64" in printed.out
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["name"] for r in rows] == list("abcdef") and rows[0]["psnr"] and not rows[2]["psnr"]
    expected = sum(
        float(pyiqa.create_metric("psnr")(to_tensor(Image.open(sr / f"{n}.png"))[None], to_tensor(Image.open(hr / f"{n}.png"))[None]))
        for n in "ab"
    ) / 2  # fmt: skip
    assert result["mean"]["psnr"] == pytest.approx(expected, abs=1e-4)
    assert "evaluate: 100%" in printed.err  # the progress bar
    assert cli([*argv, "--strict"]) == 1  # --strict: anything not scored is an error


def test_resize_hr_scores_the_other_size_and_says_so(folders, tmp_path):
    sr, hr = folders
    out = tmp_path / "scores.json"
    cli(["evaluate", "--sr-dir", str(sr), "--hr-dir", str(hr), "--out", str(out), "--resize-hr", "--no-progress"])
    row = next(r for r in json.loads(out.read_text())["per_image"] if r["name"] == "d")
    assert row["status"] == "scored" and "HR resized" in row["note"]


def test_paper_names_are_pinned_variants(folders, tmp_path):
    sr, hr = folders
    out = tmp_path / "scores.json"
    cli(["evaluate", "--sr-dir", str(sr), "--hr-dir", str(hr), "--metrics", "PSNR", "psnr", "SSIM", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["metrics"]["PSNR"] == {"pyiqa": "psnr", "options": {"test_y_channel": True, "color_space": "ycbcr"}}
    y = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr")
    a = [to_tensor(Image.open(folder / "a.png"))[None] for folder in (sr, hr)]
    row = result["per_image"][0]
    assert row["PSNR"] == pytest.approx(float(y(*a)), abs=1e-4) and row["PSNR"] != pytest.approx(row["psnr"], abs=1e-3)


def test_a_name_that_is_not_pyiqas_gets_the_close_ones(folders):
    sr, hr = folders
    with pytest.raises(ValueError, match="'topiq'.*did you mean.*'topiq_nr'"):
        cli(["evaluate", "--sr-dir", str(sr), "--hr-dir", str(hr), "--metrics", "topiq"])


@pytest.mark.parametrize(
    "metric, file",
    [("lpips", "LPIPS_v0.1_alex-df73285e.pth"), ("LPIPS", "alexnet-owt-7be5be79.pth"),
     ("dists", "DISTS_weights-f5e65c96.pth"), ("fid", "pt_inception-2015-12-05-6726825d.pth"),
     ("MANIQA", "MANIQA")],
)  # fmt: skip
def test_missing_weights_say_which_file_goes_where(folders, tmp_path, monkeypatch, metric, file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sr, hr = folders
    with pytest.raises(MetricUnavailableError, match="for evaluate") as err:
        cli(["evaluate", "--sr-dir", str(sr), "--hr-dir", str(hr), "--metrics", metric])
    assert file in str(err.value) and str(tmp_path / "torch") in str(err.value) and "MISSING" in str(err.value)


def test_a_missing_hr_folder_is_named_as_such(folders, tmp_path):
    sr, _ = folders
    with pytest.raises(FileNotFoundError, match="--hr-dir .*nowhere: no such folder"):
        cli(["evaluate", "--sr-dir", str(sr), "--hr-dir", str(tmp_path / "nowhere")])
