"""Tags for one's own photos: open_clip zero-shot over a tag vocabulary (``prepare-data --tagger open_clip``).

The paper tags each HR image with an open-vocabulary tagger; the understanding reward then counts how many of the
tags the rough description names. Here a CLIP model scores each HR image against "a photo of a {tag}." for every
tag of a vocabulary and keeps the best ``top_k`` above ``min_probability``. Weights are never downloaded: the user
places an open_clip checkpoint file and names it. Rows that already have tags (``tags.json`` or a sidecar) keep
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: the vocabulary used without ``--tag-vocabulary``: everyday objects and scenes, one per line
DEFAULT_VOCABULARY = Path(__file__).with_name("tag_vocabulary.txt")
PROMPT = "a photo of a {}."


@dataclass
class TaggerConfig:
    """Where the CLIP model comes from and how many tags each image gets."""

    model: str = "ViT-B-32"  # an open_clip architecture name, or the path of a model config JSON
    weights: str | None = None  # a local open_clip checkpoint for that architecture
    vocabulary: str | None = None  # a text file, one tag per line; None = DEFAULT_VOCABULARY
    top_k: int = 5
    min_probability: float = 0.0
    batch_size: int = 16
    device: str = "cpu"


def read_vocabulary(path: str | Path | None) -> list[str]:
    path = Path(path) if path else DEFAULT_VOCABULARY
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ValueError(f"--tag-vocabulary {path}: cannot read it ({err})") from None
    tags = list(dict.fromkeys(t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")))
    if not tags:
        raise ValueError(f"--tag-vocabulary {path} holds no tags (one per line)")
    return tags


def _architecture(model: str) -> str:
    """The open_clip name of ``model``; a config JSON is registered under its file stem first."""
    import open_clip

    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"--tagger-model {model}: no such model config file")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise ValueError(f"--tagger-model {model!r} is not an open_clip architecture (open_clip.list_models())")
    return model


class ClipTagger:
    """Zero-shot tags from an open_clip model and a local weights file."""

    def __init__(self, config: TaggerConfig):
        import open_clip
        import torch

        self.config = config
        name = _architecture(config.model)
        if not config.weights:
            raise ValueError(
                f"--tagger open_clip needs --tagger-weights: the path of an open_clip checkpoint for {name} "
                "(nothing is downloaded; e.g. the open_clip_pytorch_model.bin of one of the hub repos that "
                f"open_clip.list_pretrained() names for {name}, placed on this machine)"
            )
        if not Path(config.weights).is_file():
            raise FileNotFoundError(
                f"--tagger-weights {config.weights}: no such file. Place the open_clip checkpoint of {name} there "
                "(nothing is downloaded), or drop --tagger to keep the tags of tags.json only"
            )
        self.vocabulary = read_vocabulary(config.vocabulary)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=config.weights)
        self.model = self.model.to(config.device).eval()
        tokenizer = open_clip.get_tokenizer(name)
        with torch.no_grad():
            text = self.model.encode_text(tokenizer([PROMPT.format(t) for t in self.vocabulary]).to(config.device))
        self.text = text / text.norm(dim=-1, keepdim=True)

    def __call__(self, images) -> list[list[str]]:
        import torch

        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.config.device)
        with torch.no_grad():
            features = self.model.encode_image(pixels)
            features = features / features.norm(dim=-1, keepdim=True)
            probs = (self.model.logit_scale.exp() * features @ self.text.T).softmax(dim=-1)
        k = min(self.config.top_k, len(self.vocabulary))
        best = probs.topk(k, dim=-1)
        return [
            [self.vocabulary[i] for p, i in zip(ps.tolist(), ids.tolist()) if p >= self.config.min_probability]
            for ps, ids in zip(best.values, best.indices)
        ]


def tag_dataset(dataset, tagger: ClipTagger):
    """``dataset`` with the ``tags`` of rows that have none filled from their ``hr_image``; returns (dataset, how
    many rows were tagged)."""
    config = tagger.config
    todo = [i for i, tags in enumerate(dataset["tags"]) if not tags]
    found: dict[int, list[str]] = {}
    for start in range(0, len(todo), config.batch_size):
        rows = todo[start : start + config.batch_size]
        images = dataset.select(rows)["hr_image"]
        found.update(zip(rows, tagger(images)))

    def fill(tags, index):
        return {"tags": found.get(index, tags)}

    return dataset.map(fill, input_columns="tags", with_indices=True, desc="tags"), len(found)
