"""Upscale with a trained model (here the tiny one, loaded from disk) and evaluate against HR images."""

import json

import pyiqa
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from vlcot_grpo.cli import main as cli


def test_upscale_writes_final_images_chains_and_reports(tiny_path, photo, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    photo.resize((32, 32)).save(inputs / "astronaut.png")
    photo.rotate(90).resize((24, 24)).save(inputs / "turned.jpg")
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = cli(["upscale", "--model", str(tiny_path), "--input", str(inputs), "--out", str(out), "--lr-size", "16",
                "--sizes", "8", "16", "32", "--max-new-tokens", "300", "--seed", "1"])  # fmt: skip
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(records) == {"astronaut", "turned"}
    assert (out / "astronaut_chain.png").exists() and (out / "turned_chain.png").exists()
    for record in records.values():
        if "final" in record:
            assert Image.open(record["final"]).size == (32, 32)
        else:
            assert record["problems"]  # a failed chain says why
    assert code == (0 if all("final" in r for r in records.values()) else 1)


def test_upscale_engines_write_the_same_greedy_images(tiny_path, photo, tmp_path, monkeypatch, bench):
    """--engine and --compile reach the rollout: with guidance, both engines (the static one also with its decode
    steps compiled) write the same greedy chain and final image. Logit
    hooks make the random tiny model open the rough image at once and chain the stages (benchmarks/rollout.py)."""
    from vlcot_grpo import inference

    load = inference.load_for_inference

    def load_with_hooks(*args, **kwargs):
        model, tokenizer, backend = load(*args, **kwargs)
        bench.add_chain_hooks(model, backend)
        bias = torch.zeros(backend.vocab_size)
        bias[backend.tag_ids["<rough_image>"]] = 50.0
        model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
        return model, tokenizer, backend

    monkeypatch.setattr(inference, "load_for_inference", load_with_hooks)
    from vlcot_grpo.fast_rollout import StaticDecoder

    static_runs, run = [], StaticDecoder.run
    monkeypatch.setattr(
        StaticDecoder, "run", lambda self, *a, **k: static_runs.append(self.compile) or run(self, *a, **k)
    )
    photo.resize((32, 32)).save(tmp_path / "astronaut.png")
    outputs = {}
    for engine, extra in (("reference", []), ("static", []), ("static", ["--compile"])):
        out = tmp_path / (engine + "".join(extra))
        cli(["upscale", "--model", str(tiny_path), "--input", str(tmp_path / "astronaut.png"), "--out", str(out),
             "--lr-size", "16", "--sizes", "8", "16", "32", "--max-new-tokens", "300", "--greedy", "--guidance-scale",
             "2.0", "--engine", engine, *extra])  # fmt: skip
        record = json.loads((out / "astronaut.json").read_text())
        assert "final" in record, record
        outputs[out.name] = (record["texts"], record["problems"], (out / "astronaut.png").read_bytes())
    assert outputs["static"] == outputs["reference"] == outputs["static--compile"]
    assert static_runs == [False, True]


def test_upscale_missing_input_is_named(tiny_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cli(["upscale", "--model", str(tiny_path), "--input", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_evaluate_matches_pyiqa(photo, tmp_path):
    sr, hr = tmp_path / "sr", tmp_path / "hr"
    sr.mkdir()
    hr.mkdir()
    photo.resize((64, 64)).save(hr / "a.png")
    noisy = to_tensor(photo.resize((64, 64))) + 0.05 * torch.randn(
        3, 64, 64, generator=torch.Generator().manual_seed(0)
    )
    Image.fromarray((noisy.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(sr / "a.png")
    out = tmp_path / "scores.json"
    assert cli(["evaluate", "--sr-dir", str(sr), "--hr-dir", str(hr), "--out", str(out), "--device", "cpu"]) == 0
    scores = json.loads(out.read_text())["mean"]
    expected = pyiqa.create_metric("psnr")(
        to_tensor(Image.open(sr / "a.png"))[None], to_tensor(Image.open(hr / "a.png"))[None]
    )
    assert scores["psnr"] == pytest.approx(float(expected), abs=1e-4)
    assert 0 < scores["ssim"] < 1
