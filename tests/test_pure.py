"""The PURE / Lumina-mGPT backend against the upstream facts it encodes: PURE's image layout and token counts
(``pure/data/item_processor.py``), Chameleon's code names (``pure/model/chameleon_vae_ori/vocab.py``), LlamaGen's
l2-normalised nearest-code rule (``tokenizer/tokenizer_image/vq_model.py`` ``VectorQuantizer``), full logits where
transformers' Chameleon masks its image tokens, and the QLoRA / LoRA placement."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ChameleonForConditionalGeneration

from vlcot_grpo.models import CODE
from vlcot_grpo.models.pure import (
    END_OF_TURN,
    code_ids_from_vocab,
    code_of_name,
    image_code_name,
)
from vlcot_grpo.vlcot import encode_prompt


@pytest.mark.parametrize("side,tokens", [(128, 276), (256, 1060), (512, 4164)])
def test_token_counts_at_the_papers_sizes(tiny_pure, photo, side, tokens):
    """272 + 4, 1056 + 4 and 4160 + 4 tokens (REFERENCE: 64 x 65 = 4160 codes and row ends at 512²)."""
    backend = tiny_pure[2]
    codes = backend.encode_images([photo], (side, side))[0]
    assert codes.shape == (side // 8, side // 8)
    ids = backend.codes_to_token_ids(codes)
    assert len(ids) == tokens == len(backend.image_template(side // 8, side // 8))
    assert torch.equal(backend.parse_image_tokens(ids, (side // 8, side // 8)).codes, codes)


def test_layout_is_pures(tiny_pure):
    _, tokenizer, backend = tiny_pure
    ids = backend.codes_to_token_ids(torch.tensor([[3] * 8] * 4)).tolist()  # 32 x 64 pixels: 1 x 2 units
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:3] == ["<racm3:break>", "<reserved08801>", "<reserved08802>"]
    assert tokens[3:12] == ["IMGIMGDZ"] * 8 + ["<reserved08799>"]
    assert tokens[-1] == "<eoss>" and tokens.count("<reserved08799>") == 4 and len(tokens) == 4 * 9 + 4


def test_sizes_outside_the_32_pixel_units_are_clear_errors(tiny_pure, photo):
    backend = tiny_pure[2]
    with pytest.raises(ValueError, match="48x64.*32-pixel units"):
        backend.encode_images([photo], (48, 64))
    with pytest.raises(ValueError, match="6-code side has no PURE size token"):
        backend.image_template(6, 8)
    with pytest.raises(ValueError, match="up to 128.*<reserved08832>"):
        backend.image_template(4 * 33, 4)  # the tiny tokenizer has size tokens up to 32 units


def test_code_names_are_chameleons():
    assert image_code_name(0) == "IMGIMGAZ" and image_code_name(8191) == "IMGIMGIBJBZ"
    assert [code_of_name(image_code_name(c)) for c in (0, 7, 10, 16383)] == [0, 7, 10, 16383]
    assert code_of_name("IMGIMGBAY") == 10  # Chameleon's rule ignores the closing letter
    assert code_of_name("<reserved08799>") is None and code_of_name("IMGIMGxZ") is None
    with pytest.raises(ValueError, match="2 missing.*first \\[1, 3\\]"):
        code_ids_from_vocab({image_code_name(0): 9, image_code_name(2): 11}, 4)
    with pytest.raises(ValueError, match="named twice"):
        code_ids_from_vocab({image_code_name(0): 9, "IMGIMGAY": 10}, 1)


def test_codes_sit_where_the_tokenizer_names_them(tiny_pure):
    """Two blocks, as in the published vocabulary (Chameleon's image slots, then codes above the text)."""
    _, tokenizer, backend = tiny_pure
    ids = backend.code_token_ids
    assert tokenizer.convert_ids_to_tokens(ids[[0, 127, 128, 255]].tolist()) == [
        image_code_name(c) for c in (0, 127, 128, 255)
    ]
    assert ids[128] > ids[127] + 50  # the text and the layout tokens lie between the two blocks


def test_nearest_code_is_llamagens_l2_normalised_rule(tiny_pure, photo):
    model, _, backend = tiny_pure
    vq = model.image_tokenizer
    codes = backend.encode_images([photo], (64, 96))[0]
    # the backend's input: PIL's bicubic resize, then [-1, 1]
    array = np.asarray(photo.convert("RGB").resize((96, 64), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1.0
    with torch.no_grad():
        features = vq.quant_conv(vq.encoder(pixels))[0].permute(1, 2, 0)  # (rows, cols, dim)
        cosine = F.normalize(features, dim=-1) @ F.normalize(vq.quantize.embedding.weight, dim=-1).T
        raw_distance = torch.cdist(features.reshape(-1, features.shape[-1]), vq.quantize.embedding.weight)
    assert torch.equal(codes, cosine.argmax(-1))
    # transformers' own quantizer skips the normalisation, and picks other codes: why the backend does this step
    assert not torch.equal(codes.reshape(-1), raw_distance.argmin(-1))


@pytest.mark.parametrize("stage", [(32, 32), (64, 64), (96, 96), (64, 128)])
def test_decode_encode_at_every_stage_grid(tiny_pure, photo, stage):
    backend = tiny_pure[2]
    codes = backend.encode_images([photo], stage)
    image = backend.decode_codes(codes)[0]
    assert image.size == (stage[1], stage[0])
    again = backend.encode_images([image], stage)
    assert again.shape == codes.shape


def test_the_head_writes_image_codes(tiny_pure):
    """transformers' Chameleon sets its image tokens' logits to the dtype's minimum; this model does not, with the
    same head: the logits equal lm_head(hidden) everywhere, codes included."""
    model, _, backend = tiny_pure
    ids = torch.tensor([[1, *backend.code_token_ids[:5].tolist(), 20]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = model.model(input_ids=ids).last_hidden_state
        assert torch.equal(logits, model.lm_head(hidden))
    assert torch.isfinite(logits[..., backend.code_token_ids]).all()
    assert not hasattr(model.model, "vqmodel")  # Chameleon's VQGAN is dropped
    masked = model.model.vocabulary_mapping.image_tokens
    assert masked == []
    stock_mapping = type(model.model.vocabulary_mapping)({image_code_name(0): 4})
    assert stock_mapping.image_tokens == [4]  # what the stock class would have masked
    assert issubclass(type(model), ChameleonForConditionalGeneration)


def test_vq_model_stays_float32_under_bf16(tiny_pure_path):
    from vlcot_grpo.models import load_model

    model = load_model(str(tiny_pure_path), dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.image_tokenizer.parameters()} == {torch.float32}


def test_prompt_ends_with_the_end_of_turn(tiny_pure, photo):
    _, tokenizer, backend = tiny_pure
    prompt = encode_prompt(backend, photo, (32, 32), "Restore <|image|> please")
    assert tokenizer.convert_ids_to_tokens(prompt[-1]) == END_OF_TURN
    assert prompt[0] == tokenizer.bos_token_id
    template = backend.image_template(4, 4)
    start = prompt.index(int(template[0]))
    image = prompt[start : start + len(template)]
    assert [t for t, want in zip(image, template.tolist()) if want != CODE] == [
        t for t in template.tolist() if t != CODE
    ]


def test_text_never_samples_layout_or_size_tokens(tiny_pure):
    backend = tiny_pure[2]
    size_ids = list(backend.size_ids.values())
    assert len(size_ids) == 32 and not backend.text_token_mask[size_ids].any()
    assert not backend.text_token_mask[backend.layout_token_ids].any()
    assert not (backend.text_token_mask & backend.image_code_mask).any()


def test_lora_targets_the_language_model_only(tiny_pure):
    from peft import LoraConfig, get_peft_model

    from vlcot_grpo.models import PureBackend
    from vlcot_grpo.models.tiny import build_tiny_pure

    model, _ = build_tiny_pure()
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=PureBackend.lora_target_modules))
    targeted = {n.rsplit(".lora_A", 1)[0] for n, _ in lora.named_parameters() if ".lora_A" in n}
    layers = model.config.num_hidden_layers
    assert len(targeted) == 7 * layers
    assert all(".model.layers." in n and "image_tokenizer" not in n for n in targeted)


def test_transformers_auto_classes_load_it_once_the_package_is_imported(tiny_pure_path):
    """``import vlcot_grpo.models`` registers the ``vlcot_pure`` model type with transformers' Auto classes."""
    import subprocess
    import sys

    code = (
        "import vlcot_grpo.models\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny_pure_path)!r})\n"
        "assert type(m).__name__ == 'PureForConditionalGeneration', type(m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""}, timeout=300)
