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
    assert code == 0  # failed chains are reported, not fatal (without --strict)
    strict = cli(["upscale", "--model", str(tiny_path), "--input", str(inputs), "--out", str(out), "--lr-size", "16",
                  "--sizes", "8", "16", "32", "--max-new-tokens", "300", "--seed", "1", "--overwrite", "--strict",
                  "--no-progress"])  # fmt: skip
    assert strict == (0 if all("final" in r for r in records.values()) else 1)


@pytest.fixture
def chained(monkeypatch, presets):
    """upscale's model with logit hooks that make the random tiny model open the rough image at once and chain the
    stages (benchmarks/presets.py), so that every run writes a whole chain."""
    from vlcot_grpo import inference

    load = inference.load_for_inference

    def load_with_hooks(*args, **kwargs):
        model, tokenizer, backend = load(*args, **kwargs)
        presets.add_chain_hooks(model, backend)
        bias = torch.zeros(backend.vocab_size)
        bias[backend.tag_ids["<rough_image>"]] = 50.0
        model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
        return model, tokenizer, backend

    monkeypatch.setattr(inference, "load_for_inference", load_with_hooks)


def _greedy_upscale(tiny_path, photo, out, *flags):
    photo.resize((32, 32)).save(out.parent / "astronaut.png")
    cli(["upscale", "--model", str(tiny_path), "--input", str(out.parent / "astronaut.png"), "--out", str(out),
         "--lr-size", "16", "--sizes", "8", "16", "32", "--max-new-tokens", "300", "--greedy", "--guidance-scale",
         "2.0", *flags])  # fmt: skip
    record = json.loads((out / "astronaut.json").read_text())
    assert "final" in record, record
    return record["texts"], record["problems"], (out / "astronaut.png").read_bytes()


def test_upscale_engines_write_the_same_greedy_images(tiny_path, photo, tmp_path, monkeypatch, chained):
    """--engine and --compile reach the rollout: with guidance, both engines (the static one also with its decode
    steps compiled) write the same greedy chain and final image."""
    from vlcot_grpo.fast_rollout import StaticDecoder

    static_runs, run = [], StaticDecoder.run
    monkeypatch.setattr(
        StaticDecoder, "run", lambda self, *a, **k: static_runs.append(self.compile) or run(self, *a, **k)
    )
    outputs = {}
    for engine, extra in (("reference", []), ("static", []), ("static", ["--compile"])):
        out = tmp_path / (engine + "".join(extra))
        outputs[out.name] = _greedy_upscale(tiny_path, photo, out, "--engine", engine, *extra)
    assert outputs["static"] == outputs["reference"] == outputs["static--compile"]
    assert static_runs == [False, True]


def test_upscale_jacobi_writes_the_sequential_image_and_prints_counters(tiny_path, photo, tmp_path, chained, capsys):
    """--image-decoding jacobi (engine 'auto' picks the static engine for it, on CPU too) writes the sequential
    engine's greedy chain, and upscale prints the counters: under greedy decoding with these hooks every pass keeps
    at least its pending token, so there are at most as many passes as image tokens."""
    sequential = _greedy_upscale(tiny_path, photo, tmp_path / "sequential", "--engine", "reference")
    capsys.readouterr()
    jacobi = _greedy_upscale(
        tiny_path, photo, tmp_path / "jacobi", "--image-decoding", "jacobi", "--jacobi-window", "4"
    )
    assert jacobi == sequential
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("jacobi decoding:"))
    passes = float(line.split(":")[1].split()[0])
    assert 0.25 <= passes <= 1.0, line
    with pytest.raises(ValueError, match="jacobi_window must be at least 2"):
        _greedy_upscale(tiny_path, photo, tmp_path / "bad", "--image-decoding", "jacobi", "--jacobi-window", "1")


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


def _inputs(folder, photo):
    folder.mkdir()
    photo.resize((32, 32)).save(folder / "a.png")
    photo.rotate(90).resize((32, 32)).save(folder / "a.jpg")  # same stem: must not overwrite a.png's output
    (folder / "broken.png").write_bytes((folder / "a.png").read_bytes()[:120])  # a truncated PNG
    return folder


def test_upscale_takes_its_defaults_from_the_checkpoint(grpo_adapter, photo, tmp_path, capsys):
    """The GRPO adapter folder as --model (its base found in adapter_config.json), no size or prompt flags: the
    sizes, prompt and sampling the run was trained with; bad inputs skipped and named; a.png and a.jpg apart."""
    inputs = _inputs(tmp_path / "in", photo)
    out = tmp_path / "out"
    assert cli(["upscale", "--model", str(grpo_adapter / "out"), "--input", str(inputs), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    for setting in ("lr_size=16 [checkpoint]", "'stage_sizes': {'rough': [4, 4]", "temperature=0.7 [checkpoint]",
                    "prompt='Super-resolve <|image|>: name the degrad...' [checkpoint]", "max_new_tokens=96 [checkpoint]"):  # fmt: skip
        assert setting.replace("'stage_sizes': ", "stage_sizes=") in printed.out, (setting, printed.out)
    assert "upscale: 100%" in printed.err
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(records) == {"a_png", "a_jpg"} and records["a_jpg"]["source"].endswith("a.jpg")
    assert "skipped 1 unreadable inputs" in printed.out and "broken.png" in printed.out
    for record in records.values():
        if "final" in record:
            assert Image.open(record["final"]).size == (16, 16)
    # a second run into the same folder would overwrite: refused, unless --overwrite
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli(["upscale", "--model", str(grpo_adapter / "out"), "--input", str(inputs), "--out", str(out)])
    # a flag overrides the checkpoint
    cli(["upscale", "--model", str(grpo_adapter / "out"), "--input", str(inputs / "a.png"), "--out", str(out),
         "--overwrite", "--lr-size", "32", "--no-progress"])  # fmt: skip
    assert "lr_size=32 [flag]" in capsys.readouterr().out


def test_upscale_refuses_an_adapter_on_another_base(grpo_adapter, photo, tmp_path):
    from vlcot_grpo.models.tiny import TinyEmu3Spec, save_tiny_emu3

    other = save_tiny_emu3(tmp_path / "other", TinyEmu3Spec(seed=7))
    photo.resize((32, 32)).save(tmp_path / "a.png")
    argv = ["upscale", "--model", str(other), "--adapter", str(grpo_adapter / "out"), "--input", str(tmp_path / "a.png"),
            "--out", str(tmp_path / "sr"), "--no-progress"]  # fmt: skip
    with pytest.raises(ValueError, match="trained on another base"):
        cli(argv)
    assert cli([*argv, "--ignore-base-mismatch"]) == 0
