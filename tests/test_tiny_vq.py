"""The tiny Emu3's trained VQ tokenizer (vlcot_grpo.models.tiny_vq): reproducible, shipped, and better than random
on photos it never saw; the demo model (saved and loaded back through from_pretrained) carries it."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from vlcot_grpo.models.tiny import TinyEmu3Spec, build_tiny_emu3
from vlcot_grpo.models.tiny_vq import (
    HELDOUT_PHOTOS,
    TinyVQTrainConfig,
    build_vq,
    heldout_photo,
    load_shipped_weights,
    psnr,
    reconstruction_psnr,
    shipped_weights_metadata,
    square,
    train_tiny_vq,
    training_photo_names,
)

#: a few steps on small crops: enough to exercise crops, restarts and the optimiser, in a few seconds
SHORT = dict(steps=4, batch_size=2, crop=16, restart_every=2, short_sides=(32, 64))


def test_same_seed_same_weights_other_seed_other_weights():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = train_tiny_vq(TinyVQTrainConfig(**SHORT, seed=3))
        again = train_tiny_vq(TinyVQTrainConfig(**SHORT, seed=3))
        other = train_tiny_vq(TinyVQTrainConfig(**SHORT, seed=4))
    finally:
        torch.set_num_threads(threads)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["quantize.embedding.weight"], other["quantize.embedding.weight"])
    # the training moved the weights away from their initialisation
    init = build_vq(seed=3).state_dict()
    assert not torch.equal(first["decoder.conv_out.weight"], init["decoder.conv_out.weight"])


def test_shipped_weights_record_how_they_were_made():
    meta = shipped_weights_metadata()
    # the shipped file was made with today's defaults, so the documented command reproduces it
    assert json.loads(meta["train_config"]) == json.loads(json.dumps(asdict(TinyVQTrainConfig())))
    assert json.loads(meta["training_photos"]) == training_photo_names()
    assert not set(HELDOUT_PHOTOS) & set(training_photo_names())


@pytest.fixture(scope="module")
def trained_and_random():
    trained = build_vq()
    trained.load_state_dict(load_shipped_weights())
    return trained.eval(), build_vq(seed=0).eval()


def test_heldout_reconstruction_beats_random_vq(trained_and_random):
    trained, random = trained_and_random
    good, bad = reconstruction_psnr(trained), reconstruction_psnr(random)
    for name in HELDOUT_PHOTOS:
        assert good[name]["vq"] > bad[name]["vq"] + 3.0, (name, good[name], bad[name])
    assert np.mean([r["vq"] for r in good.values()]) > np.mean([r["vq"] for r in bad.values()]) + 6.0


def test_demo_model_decode_of_an_encoded_photo_resembles_it(tiny_emu3):
    """Through the backend of the tiny Emu3 that conftest saves with save_pretrained and loads with
    from_pretrained: encode a held-out photo at the demo's final size, decode, compare."""
    _, _, backend = tiny_emu3
    hr = square(heldout_photo("camera"), 64)
    decoded = backend.decode_codes(backend.encode_images([hr], (64, 64)))[0]
    random_model, tokenizer = build_tiny_emu3(TinyEmu3Spec(vq_weights="random"))
    from vlcot_grpo.models import load_backend

    noise = load_backend(random_model, tokenizer).decode_codes(
        load_backend(random_model, tokenizer).encode_images([hr], (64, 64))
    )[0]
    assert psnr(decoded, hr) > 17.0
    assert psnr(decoded, hr) > psnr(noise, hr) + 6.0
    # and it is the photo, not any smooth picture: another held-out photo is much further away
    other = square(heldout_photo("coins"), 64)
    assert psnr(decoded, hr) > psnr(decoded, other) + 3.0


def test_trained_vq_needs_the_default_vq_shape():
    with pytest.raises(ValueError, match="vq_weights: random"):
        build_tiny_emu3(TinyEmu3Spec(codebook_size=128))
    model, _ = build_tiny_emu3(TinyEmu3Spec(codebook_size=128, vq_weights="random"))
    assert model.model.vqmodel.quantize.embedding.num_embeddings == 128
    with pytest.raises(ValueError, match="expected 'trained' or 'random'"):
        build_tiny_emu3(TinyEmu3Spec(vq_weights="imagenet"))


@pytest.mark.slow
def test_full_training_reproduces_the_shipped_weights():
    """The documented command, in full (~15 minutes on 2 cores): fp16 of the result equals the shipped file."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(shipped_weights_metadata()["threads"]))
    try:
        state = train_tiny_vq(TinyVQTrainConfig())
    finally:
        torch.set_num_threads(threads)
    shipped = load_shipped_weights()
    assert all(torch.equal(state[k].to(torch.float16).float(), shipped[k]) for k in shipped)
