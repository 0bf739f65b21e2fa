"""`vlcot-grpo convert` on checkpoints saved in the published layouts (vlcot_grpo.models.lookalike): a PURE folder,
a Lumina-mGPT base and LlamaGen's vq_ds8_c2i.pt, tiny and random.

The upstream key lists: LlamaGen's ``VQModel`` (``tokenizer/tokenizer_image/vq_model.py``, as vendored by PURE in
``pure/model/chameleon_vae_ori/llamagen_vqgan.py``): ``encoder/decoder.conv_blocks.I.{res,attn}.J``, ``downsample`` /
``upsample``, ``mid.{0,1,2}``, ``quantize.embedding`` and ``quantize.codebook_used``; the language model's are
transformers' Chameleon names with PURE's ``(model_parallel_size, head_dim)`` query/key norms
(``pure/model/chameleon/modeling_chameleon.py`` ``ChameleonLayerNorm``)."""

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, JanusVQVAE

from vlcot_grpo.cli import main as cli
from vlcot_grpo.models import load_backend, load_model, prepare_checkpoint
from vlcot_grpo.models.convert import (
    LLAMAGEN_TO_JANUS,
    CheckpointError,
    check_keys,
    convert_checkpoint,
    vq_config_from_weights,
)
from vlcot_grpo.models.lookalike import build_upstream_chameleon, llamagen_vq_shapes, save_pure_lookalike
from vlcot_grpo.models.pure import image_code_name


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """variant -> folder holding model/ and vq_ds8_c2i.pt as published."""
    root = tmp_path_factory.mktemp("published")
    return {v: save_pure_lookalike(root / v, variant=v) for v in ("pure", "lumina")}


@pytest.fixture
def copy_of(published, tmp_path):
    def make(variant="pure"):
        dst = tmp_path / f"src-{variant}"
        shutil.copytree(published[variant], dst)
        return dst

    return make


def test_llamagen_vq8_keys_map_onto_janus_vqvae_at_the_real_size():
    """VQ-8 as LlamaGen builds it (``VQ_8``: ch_mult (1, 2, 2, 4), 2 res blocks, z 256, 16384 x 8 codes): every key
    maps onto transformers' JanusVQVAE with the same shape, none left over."""
    shapes = llamagen_vq_shapes(128, (1, 2, 2, 4), 2, 256, 16384, 8)
    assert len(shapes) == 300
    for key in (
        "encoder.conv_blocks.3.attn.1.proj_out.weight",
        "encoder.conv_blocks.1.res.0.nin_shortcut.weight",
        "encoder.conv_blocks.2.downsample.conv.weight",
        "decoder.conv_blocks.0.res.2.conv1.weight",
        "decoder.conv_blocks.2.upsample.conv.weight",
        "encoder.mid.1.q.weight",
        "quantize.codebook_used",
    ):
        assert key in shapes, key
    assert "decoder.conv_blocks.3.upsample.conv.weight" not in shapes  # the highest resolution has none
    assert shapes["encoder.conv_blocks.1.res.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    tensors = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = vq_config_from_weights(tensors, "vq")
    assert (config.num_embeddings, config.embed_dim, config.latent_channels, config.base_channels) == (
        16384, 8, 256, 128,
    )  # fmt: skip
    assert list(config.channel_multiplier) == [1, 2, 2, 4] and config.num_res_blocks == 2
    with torch.device("meta"):
        janus = JanusVQVAE(config)
    import re

    def mapped(key):
        for pattern, replacement in LLAMAGEN_TO_JANUS:
            key = re.sub(pattern, replacement, key)
        return key

    converted = {mapped(k): v for k, v in tensors.items() if k != "quantize.codebook_used"}
    check_keys(converted, {k: v.shape for k, v in janus.state_dict().items()}, "VQ-8")


@pytest.mark.parametrize("variant", ["pure", "lumina"])
def test_converted_checkpoint_gives_the_upstream_models_logits(published, tmp_path, variant):
    src = published[variant]
    out = convert_checkpoint(src / "model", src / "vq_ds8_c2i.pt", tmp_path / "converted")
    model = load_model(str(out), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    backend = load_backend(model, tokenizer)
    source_vocab = json.loads((src / "model" / "config.json").read_text())["vocab_size"]
    upstream = build_upstream_chameleon(None, source_vocab, 0)  # the model the published weights are of
    ids = torch.tensor([[0, 5, 140, 200, 300, source_vocab - 1]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = upstream.lm_head(upstream.model(input_ids=ids).last_hidden_state)  # unmasked
    torch.testing.assert_close(ours[..., :source_vocab], theirs, rtol=0, atol=1e-5)
    codes = backend.code_token_ids
    assert codes.numel() == 256 and tokenizer.convert_ids_to_tokens(int(codes[200])) == image_code_name(200)
    record = json.loads((out / "vlcot_convert.json").read_text())
    if variant == "lumina":  # a base naming only Chameleon's image slots: the second half is added above the text
        assert record["codes_added"] == [128, 255] and model.config.vocab_size == source_vocab + 128
        assert codes[128:].tolist() == list(range(source_vocab, source_vocab + 128))
        head = model.lm_head.weight
        torch.testing.assert_close(head[codes[128:]], head[codes[:128]].mean(0).expand(128, -1))
    else:
        assert record["codes_added"] is None and model.config.vocab_size == source_vocab
    assert record["dropped"] == ["model.vqmodel.*"]


def test_converted_checkpoint_prepares_and_rolls_out(published, tmp_path, photo):
    from vlcot_grpo.rollout import RolloutConfig, RolloutEngine
    from vlcot_grpo.vlcot import encode_prompt

    src = published["pure"]
    out = convert_checkpoint(src / "model", src / "vq_ds8_c2i.pt", tmp_path / "converted")
    prepared = tmp_path / "prepared"
    assert prepare_checkpoint(out, prepared).how == "added"  # no reserved token is re-purposed for this family
    model = load_model(str(prepared), dtype=torch.float32).eval()
    backend = load_backend(model, AutoTokenizer.from_pretrained(prepared))
    sizes = {"rough": (32, 32), "middle": (32, 32), "final": (64, 64)}
    prompt = encode_prompt(backend, photo, (32, 32)) + [backend.tag_ids["<rough_image>"]]
    config = RolloutConfig(stage_sizes=sizes, max_new_tokens=30, do_sample=False)
    batch = RolloutEngine(model, backend, config).generate([prompt], 1)
    ids = batch.completion_ids[0]
    image = backend.parse_image_tokens(ids[: len(backend.image_template(4, 4))], (4, 4))
    assert image.ok, image.error
    assert backend.decode_codes(image.codes)[0].size == (32, 32)


def _shards(folder):
    return sorted((folder / "model").glob("model-*.safetensors"))


def _edit_shard(folder, edit):
    shard = _shards(folder)[0]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_a_missing_language_model_key_is_named(copy_of, tmp_path):
    src = copy_of()
    victim = {}

    def drop(tensors):
        victim["key"] = next(k for k in sorted(tensors) if k.startswith("model.layers.") and "mlp" in k)
        del tensors[victim["key"]]

    _edit_shard(src, drop)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): " + victim["key"].replace(".", r"\.")):
        convert_checkpoint(src / "model", src / "vq_ds8_c2i.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_misshapen_and_an_unexpected_key_are_named(copy_of, tmp_path):
    src = copy_of()

    def damage(tensors):
        key = next(k for k in sorted(tensors) if k.endswith("mlp.down_proj.weight"))
        tensors[key] = tensors[key][:, :-1].contiguous()
        tensors["model.extra_layer.weight"] = torch.zeros(2)

    _edit_shard(src, damage)
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(src / "model", src / "vq_ds8_c2i.pt", tmp_path / "out")
    message = str(err.value)
    assert "1 unexpected key(s): model.extra_layer.weight" in message
    assert (
        "1 misshapen key(s): model.layers." in message and "down_proj.weight: (64, 127), expected (64, 128)" in message
    )


def test_a_norm_that_fits_no_head_count_is_named(copy_of, tmp_path):
    src = copy_of()

    def damage(tensors):
        key = next(k for k in sorted(tensors) if k.endswith("q_norm.weight"))
        tensors[key] = torch.ones(3, tensors[key].shape[-1])

    _edit_shard(src, damage)
    with pytest.raises(CheckpointError, match=r"q_norm\.weight has 3 rows, which do not divide the 4 heads"):
        convert_checkpoint(src / "model", src / "vq_ds8_c2i.pt", tmp_path / "out")


def test_a_missing_vq_key_is_named(copy_of, tmp_path):
    src = copy_of()
    checkpoint = torch.load(src / "vq_ds8_c2i.pt", weights_only=False)
    del checkpoint["model"]["decoder.conv_blocks.1.res.0.conv2.bias"]
    torch.save(checkpoint, src / "vq_ds8_c2i.pt")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): image_tokenizer\.decoder\.up\.1\.block\.0\.conv2"):
        convert_checkpoint(src / "model", src / "vq_ds8_c2i.pt", tmp_path / "out")


class _NotATensor:
    pass


def test_the_vq_file_is_read_as_tensors_only(copy_of, tmp_path):
    src = copy_of()
    checkpoint = torch.load(src / "vq_ds8_c2i.pt", weights_only=False)
    assert isinstance(checkpoint["args"], argparse.Namespace)  # LlamaGen's own format: let through
    checkpoint["extra"] = _NotATensor()  # anything else pickled is refused, never run
    torch.save(checkpoint, src / "vq_ds8_c2i.pt")
    with pytest.raises(CheckpointError, match="vq_ds8_c2i.pt: not a readable tensor checkpoint"):
        convert_checkpoint(src / "model", src / "vq_ds8_c2i.pt", tmp_path / "out")


def test_a_tokenizer_naming_some_codes_is_refused(copy_of, tmp_path):
    src = copy_of()
    path = src / "model" / "tokenizer.json"
    data = json.loads(path.read_text())
    drop = {image_code_name(c) for c in range(3)}
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k not in drop}
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in drop]
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="names 253 of the VQ model's 256 image codes.*--text-tokenizer"):
        convert_checkpoint(src / "model", src / "vq_ds8_c2i.pt", tmp_path / "out")


def test_cli_converts_refuses_an_existing_out_and_names_errors(copy_of, tmp_path, capsys):
    src = copy_of()
    out = tmp_path / "converted"
    argv = ["convert", "--model", str(src / "model"), "--vq", str(src / "vq_ds8_c2i.pt"), "--out", str(out)]
    assert cli(argv) == 0
    assert f"next: vlcot-grpo prepare --model {out}" in capsys.readouterr().out
    assert cli(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli([*argv, "--overwrite"]) == 0
    assert cli(["convert", "--model", str(tmp_path), "--vq", "x.pt", "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
