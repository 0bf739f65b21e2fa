"""The bundled demo dataset: real photographs that ship inside installed packages, so it builds offline.

Seven training photos, all public domain or CC0 (licences and credits in ``demo_annotations.json``): six from
scikit-image's bundled sample data (astronaut, chelsea, coffee, rocket, hubble_deep_field, retina) and
``grace_hopper.jpg`` from matplotlib's sample data; and three held-out photos (split ``heldout``: scikit-image's
camera, coins and immunohistochemistry, CC0 or "no known copyright restrictions") that nothing trains on, for
evaluating what training did on photos it never saw. Each comes with 3-6 object tags and a one-line caption written
for this project. :func:`build_demo_dataset` turns a split into a VLCoT dataset (default: 64x64 HR, the size of the
embedded tiny model's final stage) in a few seconds.
"""

from __future__ import annotations

import io
import json
import os
from functools import lru_cache
from importlib import resources
from typing import Any

import datasets
import numpy as np
from PIL import Image

from vlcot_grpo.data.dataset import StageSizes, build_vlcot_dataset, read_rgb_image

ANNOTATIONS_FILE = "demo_annotations.json"
#: The splits of ``demo_annotations.json``: SFT, GRPO and the tiny VQ train on "train" only.
SPLITS = ("train", "heldout")


@lru_cache(maxsize=1)
def _annotation_file() -> dict[str, Any]:
    text = resources.files("vlcot_grpo.data").joinpath(ANNOTATIONS_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def demo_annotations(split: str | None = "train") -> list[dict[str, Any]]:
    """One dict per demo image of ``split`` (None: all): name, loader, licence, credit, tags, caption, split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"demo split {split!r}: expected one of {SPLITS} or None")
    entries = [dict(entry) for entry in _annotation_file()["images"]]
    return [entry for entry in entries if split is None or entry["split"] == split]


def load_demo_image_bytes(loader: str) -> bytes:
    """Encoded bytes of a demo image. ``loader`` is ``"skimage:<function>"`` or ``"matplotlib:<sample file>"``."""
    package, _, name = loader.partition(":")
    if package == "skimage":
        import skimage.data

        pixels = np.asarray(getattr(skimage.data, name)())
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()
    if package == "matplotlib":
        from matplotlib import cbook

        with open(cbook.get_sample_data(name, asfileobj=False), "rb") as file:
            return file.read()
    raise ValueError(f"unknown demo image loader {loader!r}; expected 'skimage:<name>' or 'matplotlib:<file>'")


def load_demo_image(name: str) -> Image.Image:
    """One demo photo by name (e.g. "chelsea") as an RGB PIL image."""
    for entry in demo_annotations(None):
        if entry["name"] == name:
            return read_rgb_image(load_demo_image_bytes(entry["loader"]), entry["loader"])
    raise KeyError(f"no demo image {name!r}; available: {[entry['name'] for entry in demo_annotations(None)]}")


def _source_name(entry: dict[str, Any]) -> str:
    """scikit-image photos are re-encoded as PNG; matplotlib's file keeps its own name."""
    package, _, name = entry["loader"].partition(":")
    return name if package == "matplotlib" else f"{entry['name']}.png"


def demo_source_dataset(split: str = "train") -> datasets.Dataset:
    """The raw demo photos of ``split``: columns ``image`` (Image), ``tags``, ``caption``, ``source``, ``licence``."""
    entries = demo_annotations(split)
    rows = {
        "image": [{"bytes": load_demo_image_bytes(entry["loader"]), "path": None} for entry in entries],
        "tags": [entry["tags"] for entry in entries],
        "caption": [entry["caption"] for entry in entries],
        "source": [_source_name(entry) for entry in entries],
        "licence": [entry["licence"] for entry in entries],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "tags": datasets.List(datasets.Value("string")),
            "caption": datasets.Value("string"),
            "source": datasets.Value("string"),
            "licence": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def build_demo_dataset(
    hr_size: int = 64,
    scale: int = 4,
    stage_sizes: StageSizes | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    split: str = "train",
    degradations_per_image: int = 1,
) -> datasets.Dataset:
    """The demo VLCoT dataset of ``split`` (columns as :func:`~vlcot_grpo.data.dataset.build_vlcot_dataset`), built
    offline. Each photo's degradation depends on ``seed`` and its content only, so the splits never interact.

    ``stage_sizes``: three ints or (h, w) pairs, or {"rough": ..., "middle": ..., "final": ...}; default
    (hr/4, hr/2, hr). ``cache_dir`` defaults to :func:`~vlcot_grpo.data.dataset.default_cache_dir`.
    ``degradations_per_image``: rows per photo, copy k degraded as at ``seed + k``.
    """
    return build_vlcot_dataset(
        demo_source_dataset(split),
        hr_size=hr_size,
        scale=scale,
        stage_sizes=stage_sizes,
        seed=seed,
        degradations_per_image=degradations_per_image,
        source_column="source",
        cache_dir=cache_dir,
        progress=False,
    )
