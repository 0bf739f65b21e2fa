"""prepare-data --tagger open_clip: zero-shot tags for untagged photos, with a random-weight CLIP saved offline
(the mechanics: the real model, preprocessing and tokenizer, not the tags' quality), and the missing-weights
message."""

import json

import datasets
import open_clip
import pytest
import torch

from vlcot_grpo.cli import main as cli
from vlcot_grpo.data.tagging import DEFAULT_VOCABULARY, ClipTagger, TaggerConfig, read_vocabulary

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip architecture as a config file and its random weights as a checkpoint file."""
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "vlcot-tagger-tiny.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    weights = folder / "tiny-clip.pt"
    torch.save(open_clip.create_model("vlcot-tagger-tiny").state_dict(), weights)
    return config, weights


@pytest.fixture
def photos(photo, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(("astronaut", "turned", "small")):
        photo.rotate(40 * i).resize((64, 64)).save(folder / f"{name}.png")
    (folder / "tags.json").write_text(json.dumps({"astronaut.png": {"tags": ["astronaut"], "caption": "A person."}}))
    return folder


def test_prepare_data_tags_the_untagged_photos(tiny_clip, photos, tmp_path, capsys):
    config, weights = tiny_clip
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("# mine\ndog\ncat\nrocket\nflag\nsky\n")
    out = tmp_path / "data"
    code = cli(["prepare-data", "--hr-dir", str(photos), "--out", str(out), "--hr-size", "32", "--no-progress",
                "--cache-dir", str(tmp_path / "cache"), "--tagger", "open_clip", "--tagger-model", str(config),
                "--tagger-weights", str(weights), "--tag-vocabulary", str(vocabulary), "--tags-per-image", "2"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr()
    assert "tagged 2 photos with open_clip" in printed.out and "have no tags" not in printed.err
    rows = {r["source"]: r for r in datasets.load_from_disk(str(out))}
    assert rows["astronaut.png"]["tags"] == ["astronaut"]  # tags.json wins
    # the two others: the tagger's own top 2 for each, out of the vocabulary
    tagger = ClipTagger(TaggerConfig(model=str(config), weights=str(weights), vocabulary=str(vocabulary), top_k=2))
    for name in ("turned.png", "small.png"):
        assert rows[name]["tags"] == tagger([rows[name]["hr_image"]])[0]
        assert len(rows[name]["tags"]) == 2 and set(rows[name]["tags"]) <= {"dog", "cat", "rocket", "flag", "sky"}


def test_missing_weights_name_the_file_and_what_goes_there(photos, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "open_clip_pytorch_model.bin"
    code = cli(["prepare-data", "--hr-dir", str(photos), "--out", str(tmp_path / "data"), "--tagger", "open_clip",
                "--tagger-weights", str(missing)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert f"--tagger-weights {missing}: no such file" in err and "ViT-B-32" in err and "nothing is downloaded" in err
    assert not (tmp_path / "data").exists()
    assert cli(["prepare-data", "--hr-dir", str(photos), "--out", str(tmp_path / "d"), "--tagger", "open_clip"]) == 2
    assert "needs --tagger-weights" in capsys.readouterr().err


def test_the_bundled_vocabulary_reads():
    tags = read_vocabulary(DEFAULT_VOCABULARY)
    assert len(tags) > 100 and "dog" in tags and not any(t.startswith("#") for t in tags)
