"""Janus: the one-vocabulary view against transformers' own Janus (its tables, heads and VQ decode), the stock class
loading what this one saves, activation checkpointing, and the SFT loss scored through both heads."""

import pytest
import torch
from transformers import JanusForConditionalGeneration

from test_sft import manual_loss, sft_config, vlcot_rows
from vlcot_grpo.models.llamagen import decode_codes
from vlcot_grpo.sft import VLCoTSFTTrainer


@pytest.fixture(scope="module")
def stock(tiny_janus_path):
    """The tiny Janus as transformers' own class loads it."""
    return JanusForConditionalGeneration.from_pretrained(tiny_janus_path, dtype=torch.float32).eval()


def _mixed_ids(backend, seed=0):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, len(backend.tokenizer), (2, 7), generator=gen)
    codes = torch.randint(0, backend.codebook_size, (2, 9), generator=gen)
    return torch.cat([text, backend.code_token_ids[codes], text[:, :3]], dim=1), text, codes


def test_the_joined_view_is_janus_own_tables_and_heads(tiny_janus, stock):
    """Text ids go through the text table, code ids through the image table and aligner, exactly as Janus's
    generate embeds them; the logits are lm_head's then generation_head's, computed by the stock modules."""
    model, _, backend = tiny_janus
    ids, text, codes = _mixed_ids(backend)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        embeds = torch.cat(
            [
                stock.get_input_embeddings()(text),
                stock.prepare_embeddings_for_image_generation(codes),
                stock.get_input_embeddings()(text[:, :3]),
            ],
            dim=1,
        )
        hidden = stock.model.language_model(inputs_embeds=embeds).last_hidden_state
        theirs = torch.cat([stock.lm_head(hidden), stock.model.generation_head(hidden)], dim=-1)
    assert ours.shape[-1] == backend.vocab_size == backend.text_rows + backend.codebook_size
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # logits_to_keep keeps the last positions of both heads
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=2).logits, ours[:, -2:], rtol=1e-5, atol=1e-5)


def test_the_stock_class_loads_what_this_one_saves(tiny_janus, stock, tmp_path):
    model, _, backend = tiny_janus
    model.save_pretrained(tmp_path / "saved")
    again = JanusForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert set(again.state_dict()) == set(stock.state_dict())
    ids = _mixed_ids(backend)[1]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, stock(input_ids=ids).logits)


def test_any_grid_decode_is_transformers_own_at_its_grid(tiny_janus, stock):
    """At the configured grid (num_patches²) the any-grid decode is transformers' JanusVQVAE.decode; other grids,
    which that decode refuses, decode to their own size."""
    _, _, backend = tiny_janus
    side = stock.config.vq_config.num_patches
    codes = torch.randint(0, backend.codebook_size, (2, side, side), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = stock.model.vqmodel.decode(codes.view(2, -1))
        ours = decode_codes(stock.model.vqmodel, codes)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    other = torch.randint(0, backend.codebook_size, (2, side + 1, side + 3))
    with pytest.raises(ValueError):
        stock.model.vqmodel.decode(other.view(2, -1))
    images = backend.decode_codes(other)
    assert [im.size for im in images] == [((side + 3) * backend.downsample, (side + 1) * backend.downsample)] * 2


def test_activation_checkpointing_gives_the_same_gradients(tiny_janus_path):
    from vlcot_grpo.models import load_model

    grads = []
    for checkpointing in (False, True):
        model = load_model(str(tiny_janus_path), dtype=torch.float32).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.cat([torch.arange(5, 25)[None], torch.arange(140, 160)[None]], dim=1)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("generation_head" in n for n in grads[0])
    assert any("generation_embeddings" in n for n in grads[0])  # code inputs reach the image table
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("image_weight", [0.3, 1.0])
def test_sft_loss_is_scored_through_both_heads(tiny_janus_path, tiny_janus, tmp_path, image_weight):
    """TRL's fused LM head would score every label on lm_head alone (code labels beyond it); here the SFT loss, at
    image_loss_weight 1 (SFTTrainer's own loss) and below (the weighted one), equals the weighted NLL of the model's
    joined logits."""
    from vlcot_grpo.models import load_model

    backend = tiny_janus[2]
    model = load_model(str(tiny_janus_path), dtype=torch.float32)
    args = sft_config(tmp_path, image_loss_weight=image_weight, per_device_train_batch_size=4)
    trainer = VLCoTSFTTrainer(model, args, vlcot_rows(), tiny_janus[1])
    trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    targets = batch["labels"][:, 1:]
    assert (targets >= backend.text_rows).any()  # code labels, which lm_head alone cannot score
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    expected = manual_loss(trainer.model, batch, backend.image_code_mask, image_weight)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
