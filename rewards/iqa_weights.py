"""Which weight files a pyiqa metric needs, where pyiqa looks for them, and a clear error when they are missing.

pyiqa downloads weights on first use. On a machine without internet that fails deep inside a model constructor
with a message that names neither the file nor the folder. The generation reward calls ``explain_failure`` to turn
that into an error that says exactly what to place where. The file names are read from pyiqa's (and timm's) own
tables at run time, so they follow the installed versions.

Where pyiqa looks (all under torch's hub folder, ``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``):

* pyiqa's own checkpoints: ``<hub>/pyiqa/<file>``, downloaded from the Hugging Face repo
  ``chaofengc/IQA-PyTorch-Weights`` (``pyiqa.utils.download_util.load_file_from_url``);
* OpenAI CLIP backbones (CLIPIQA, some TOPIQ variants): ``<hub>/clip/<file>`` (``pyiqa.archs.clip_model.load``);
* timm backbones (TOPIQ's ResNet-50, MANIQA's ViT): the Hugging Face cache (``$HF_HOME/hub``), repo ``timm/<name>``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import torch


@dataclass(frozen=True)
class WeightFile:
    """One file a metric needs. ``folder`` is where it must be placed (or, for ``kind="hf"``, the HF cache)."""

    what: str
    file_name: str
    folder: str
    source: str  # the URL it is downloaded from, or the Hugging Face repo id (kind "hf")
    kind: str = "file"  # "file": a plain file in ``folder``; "hf": a Hugging Face cache entry
    alternative: bool = False  # True when the metric needs one of several listed files, not all

    @property
    def present(self) -> bool:
        if self.kind == "hf":
            from huggingface_hub import try_to_load_from_cache

            # timm reads model.safetensors, or pytorch_model.bin from older repos.
            return any(
                isinstance(try_to_load_from_cache(self.source, name, cache_dir=self.folder), str)
                for name in (self.file_name, "pytorch_model.bin")
            )
        return os.path.isfile(os.path.join(self.folder, self.file_name))

    def describe(self) -> str:
        state = "present" if self.present else "MISSING"
        if self.kind == "hf":
            return (
                f"{self.what}: {self.file_name} of the Hugging Face repo {self.source!r} in the HF cache {self.folder} "
                f"[{state}] (on a machine with internet: `hf download {self.source}`, then copy the cache folder)"
            )
        return f"{self.what}: file {self.file_name} in folder {self.folder} [{state}] (download: {self.source})"


def pyiqa_cache_dir() -> str:
    """The folder pyiqa keeps its checkpoints in: ``$TORCH_HOME/hub/pyiqa`` as it was when pyiqa was imported."""
    from pyiqa.utils import download_util

    return download_util.DEFAULT_CACHE_DIR


def clip_cache_dir() -> str:
    """The folder pyiqa's CLIP loader reads backbones from: ``$TORCH_HOME/hub/clip``."""
    return os.path.join(torch.hub.get_dir(), "clip")


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _pyiqa_checkpoint(url: str, what: str, alternative: bool = False) -> WeightFile:
    return WeightFile(what, os.path.basename(urlparse(url).path), pyiqa_cache_dir(), url, alternative=alternative)


def _clip_backbone(backbone: str) -> WeightFile:
    from pyiqa.archs.clip_model import _MODELS as CLIP_URLS

    url = CLIP_URLS[backbone]
    return WeightFile(f"OpenAI CLIP {backbone} backbone", os.path.basename(url), clip_cache_dir(), url)


def _timm_backbone(model_name: str) -> WeightFile:
    import timm

    repo = timm.models.get_pretrained_cfg(model_name).hf_hub_id
    return WeightFile(f"timm {model_name} backbone", "model.safetensors", hf_cache_dir(), repo, kind="hf")


def _arch_urls(module: str) -> dict[str, str]:
    return importlib.import_module(f"pyiqa.archs.{module}").default_model_urls


# One function per pyiqa architecture used by the default metrics: metric options -> files it loads.
def _topiq_files(opts: dict) -> list[WeightFile]:
    files = [_pyiqa_checkpoint(_arch_urls("topiq_arch")[opts["model_name"]], f"TOPIQ checkpoint {opts['model_name']}")]
    backbone = opts.get("semantic_model_name", "resnet50")
    if backbone.startswith("clip_"):
        files.append(_clip_backbone(backbone.removeprefix("clip_")))
    elif "swin" not in backbone:  # swin backbones are built by pyiqa itself, from the TOPIQ checkpoint
        files.append(_timm_backbone(backbone))
    return files


def _musiq_files(opts: dict) -> list[WeightFile]:
    pretrained = opts.get("pretrained", True)
    key = "ava" if pretrained is True else pretrained
    return [_pyiqa_checkpoint(_arch_urls("musiq_arch")[key], f"MUSIQ checkpoint ({key})")]


def _maniqa_files(opts: dict) -> list[WeightFile]:
    dataset = opts.get("train_dataset", "pipal")
    checkpoint = _pyiqa_checkpoint(_arch_urls("maniqa_arch")[dataset], f"MANIQA checkpoint ({dataset})")
    return [checkpoint, _timm_backbone("vit_base_patch8_224")]


def _clipiqa_files(opts: dict) -> list[WeightFile]:
    files = [_clip_backbone(opts.get("backbone", "RN50"))]
    model_type = opts.get("model_type", "clipiqa")
    if model_type != "clipiqa":
        try:
            urls = _arch_urls("clipiqa_arch")  # imports OpenAI's clip package, which may be broken
        except ImportError:
            return files
        if model_type in urls:
            files.append(_pyiqa_checkpoint(urls[model_type], f"CLIPIQA+ weights ({model_type})"))
    return files


def _torchvision_backbone(weights) -> WeightFile:
    """A torchvision ImageNet backbone (LPIPS, DISTS): ``<hub>/checkpoints/<file>``."""
    url = weights.url
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return WeightFile(f"torchvision {weights}", os.path.basename(urlparse(url).path), folder, url)


def _lpips_files(opts: dict) -> list[WeightFile]:
    import torchvision.models as tv

    net, version = opts.get("net", "alex"), opts.get("version", "0.1")
    backbone = {"alex": tv.AlexNet_Weights, "vgg": tv.VGG16_Weights, "squeeze": tv.SqueezeNet1_1_Weights}[net]
    checkpoint = _pyiqa_checkpoint(_arch_urls("lpips_arch")[f"{version}_{net}"], f"LPIPS {version} {net} layers")
    return [checkpoint, _torchvision_backbone(backbone.IMAGENET1K_V1)]


def _dists_files(opts: dict) -> list[WeightFile]:
    import torchvision.models as tv

    checkpoint = _pyiqa_checkpoint(_arch_urls("dists_arch")["url"], "DISTS weights")
    return [checkpoint, _torchvision_backbone(tv.VGG16_Weights.IMAGENET1K_V1)]


def _fid_files(opts: dict) -> list[WeightFile]:
    from pyiqa.archs.inception import FID_WEIGHTS_URL

    return [_pyiqa_checkpoint(FID_WEIGHTS_URL, "FID InceptionV3 weights")]


ARCH_FILES: dict[str, Callable[[dict], list[WeightFile]]] = {
    "CFANet": _topiq_files,
    "MUSIQ": _musiq_files,
    "MANIQA": _maniqa_files,
    "CLIPIQA": _clipiqa_files,
    "LPIPS": _lpips_files,
    "DISTS": _dists_files,
    "FID": _fid_files,
}

# Architecture type -> module, for the fallback listing of metrics without a resolver above.
_ARCH_MODULE_SUFFIX = "_arch"


def weight_files(metric: str) -> list[WeightFile]:
    """The weight files pyiqa loads for ``metric`` (empty for metrics that need none, e.g. psnr, ssim, entropy).

    Exact for the architectures in ``ARCH_FILES`` (the paper's four metrics); for others, every checkpoint in the
    architecture module's ``default_model_urls``, marked ``alternative`` (the metric loads one of them).
    """
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    opts = dict(DEFAULT_CONFIGS[metric]["metric_opts"])
    arch = opts.pop("type")
    try:
        if arch in ARCH_FILES:
            return ARCH_FILES[arch](opts)
        urls = _arch_urls(f"{arch.lower()}{_ARCH_MODULE_SUFFIX}")
    except (ImportError, AttributeError, KeyError):
        # The architecture module cannot even be imported (e.g. a missing dependency): nothing to list.
        return []
    files = {}
    for key, url in urls.items():
        file = _pyiqa_checkpoint(url, f"{arch} checkpoint {key!r}", alternative=True)
        files.setdefault(file.file_name, file)
    return list(files.values())


def hub_offline() -> bool:
    """True when the user said there is no hub (``HF_HUB_OFFLINE=1``): then nothing should be downloaded."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


class MetricUnavailableError(RuntimeError):
    """A pyiqa metric could not be created: weights missing and not downloadable, or a missing Python module."""


def missing_weights_error(
    metric: str, files: list[WeightFile], cause: BaseException | None = None, purpose: str = "the generation reward"
) -> str:
    """The message of the error raised when ``metric`` cannot be created; lists every file and its state."""
    lines = [f"cannot create the pyiqa metric {metric!r} for {purpose}"]
    if cause is not None:
        lines[0] += f": {type(cause).__name__}: {cause}"
    if isinstance(cause, ModuleNotFoundError):
        lines.append(
            f"  A Python module is missing ({cause.name!r}); this is not a weights problem. pyiqa's CLIP-based "
            "metrics import the OpenAI 'clip' package, which needs 'pkg_resources' (setuptools<81)."
        )
    if files:
        need = "one of these files" if any(f.alternative for f in files) else "these files"
        lines.append(f"  {metric!r} needs {need}; place missing ones where shown (or allow downloads):")
        lines += [f"  - {f.describe()}" for f in files]
    else:
        lines.append("  (no weight files are known for this metric)")
    lines.append(
        f"  pyiqa's folders: checkpoints {pyiqa_cache_dir()}, CLIP {clip_cache_dir()}, timm/HF cache {hf_cache_dir()}"
        " (set TORCH_HOME / HF_HOME before starting to move them)."
    )
    return "\n".join(lines)
