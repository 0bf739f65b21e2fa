"""prepare-data and the image readers never lose data or open what they should not: --out may not be or hold the
photos, --overwrite swaps the new dataset in atomically (kills simulated between its steps), only the accepted image
formats are decoded, and every file left out is named."""

import argparse
import os

import datasets
import pytest
import skimage.data
from PIL import Image

from vlcot_grpo.data import cli
from vlcot_grpo.data.cli import MARKER_FILE, add_prepare_data_arguments, recover_interrupted, run_prepare_data
from vlcot_grpo.data.dataset import BadImageError, open_rgb_image

HR = 32


def prepare_data(*argv):
    parser = argparse.ArgumentParser()
    add_prepare_data_arguments(parser)
    return run_prepare_data(parser.parse_args(list(argv)))


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(("astronaut", "chelsea", "coffee")):
        Image.fromarray(getattr(skimage.data, name)()).resize((48 + i, 48)).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("my notes")
    return folder


def _args(photos, tmp_path, out, *extra):
    return [
        "--hr-dir",
        str(photos),
        "--out",
        str(out),
        "--hr-size",
        str(HR),
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
        *extra,
    ]


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_out_may_not_be_inside_or_around_the_photos(photos, tmp_path, capsys, where):
    out = {"same": photos, "inside": photos / "dataset", "parent": tmp_path}[where]
    before = _files(photos)
    assert prepare_data(*_args(photos, tmp_path, out, "--overwrite")) == 2
    assert "--hr-dir" in capsys.readouterr().err
    assert _files(photos) == before and (photos / "notes.txt").read_text() == "my notes"


def test_overwrite_replaces_only_a_dataset_prepare_data_wrote(photos, tmp_path, capsys):
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("precious")
    assert prepare_data(*_args(photos, tmp_path, other, "--overwrite")) == 2
    assert "not a dataset written by prepare-data" in capsys.readouterr().err
    assert (other / "chapter1.tex").read_text() == "precious"
    out = tmp_path / "data"
    assert prepare_data(*_args(photos, tmp_path, out)) == 0
    assert (out / MARKER_FILE).is_file()
    assert prepare_data(*_args(photos, tmp_path, out, "--overwrite", "--seed", "3")) == 0
    assert len(datasets.load_from_disk(str(out))) == 3


@pytest.mark.parametrize("kill_at", ["replace-1", "replace-2", "rmtree"])
def test_a_kill_during_overwrite_leaves_a_complete_dataset(photos, tmp_path, monkeypatch, kill_at):
    """The swap's steps are: old -> .out.previous, staging -> out, remove .out.previous. A kill at any of them
    leaves out (or, between the renames, .out.previous) complete, and the next prepare-data puts it right."""
    out = tmp_path / "data"
    assert prepare_data(*_args(photos, tmp_path, out, "--seed", "1")) == 0
    old = datasets.load_from_disk(str(out))["lr_image"][0].tobytes()
    calls = {"replace": 0}
    real_replace, real_rmtree = os.replace, cli.shutil.rmtree

    class Killed(BaseException):
        pass

    def replace(src, dst):
        calls["replace"] += 1
        if kill_at == f"replace-{calls['replace']}":
            raise Killed
        return real_replace(src, dst)

    def rmtree(path, *a, **k):
        if kill_at == "rmtree" and str(path).endswith(".previous"):
            raise Killed
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(cli.os, "replace", replace)
    monkeypatch.setattr(cli.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        prepare_data(*_args(photos, tmp_path, out, "--overwrite", "--seed", "2"))
    monkeypatch.undo()
    previous = tmp_path / ".data.previous"
    complete = out if out.exists() else previous  # between the renames, the old one waits complete
    assert len(datasets.load_from_disk(str(complete))) == 3
    recover_interrupted(out)
    now = datasets.load_from_disk(str(out))["lr_image"][0].tobytes()
    assert not previous.exists() and not list(tmp_path.glob(".data.new-*"))
    assert (now == old) == (kill_at == "replace-1" or kill_at == "replace-2")  # old kept, or the new one arrived


def test_sizes_that_do_not_divide_and_an_out_that_is_a_file_are_refused(photos, tmp_path, capsys):
    assert prepare_data(*_args(photos, tmp_path, tmp_path / "d", "--scale", "3")) == 2
    assert "not a multiple of --scale 3" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert prepare_data(*_args(photos, tmp_path, afile)) == 2
    assert "is a file" in capsys.readouterr().err


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n"


def test_only_accepted_formats_are_decoded(photos, tmp_path, monkeypatch, capsys):
    """An EPS file named like a PNG never reaches PIL's EPS plugin (which calls Ghostscript); a dangling link and a
    folder named like an image are named in the summary, not skipped in silence."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self) or None)
    (photos / "photo.png").write_bytes(EPS)
    (photos / "gone.jpg").symlink_to(photos / "missing.jpg")
    (photos / "folder.png").mkdir()
    with pytest.raises(BadImageError, match="accepted format"):
        open_rgb_image(photos / "photo.png")
    assert prepare_data(*_args(photos, tmp_path, tmp_path / "d")) == 0
    printed = capsys.readouterr().out
    assert not opened
    for name in ("photo.png", "gone.jpg", "folder.png"):
        assert name in printed
    assert "not_a_file" in printed
