"""Generation reward: no-reference image quality of the decoded final image, by an ensemble of pyiqa metrics."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from vlcot_grpo.vlcot import STAGES

from .base import Reward, log_metric, mean, stage_images
from .iqa_weights import MetricUnavailableError, hub_offline, missing_weights_error, weight_files

#: The paper's "visual expert": these four pyiqa metrics, averaged.
DEFAULT_METRICS: tuple[str, ...] = ("topiq_nr", "musiq", "maniqa-pipal", "clipiqa")

#: Default divisors: MUSIQ (KonIQ / SPAQ / PaQ-2-PiQ heads) scores on a 0-100 scale, the others on 0-1.
DEFAULT_SCALES: dict[str, float] = {"musiq": 100.0, "musiq-koniq": 100.0, "musiq-spaq": 100.0, "musiq-paq2piq": 100.0}


def make_normalizer(metric: str, spec, lower_better: bool) -> Callable[[float], float]:
    """Turn a normalisation spec into a function raw score -> reward contribution.

    ``spec`` is one of: ``None`` (the default below), ``"identity"``, ``"invert"`` (``1 / (1 + x)``, for
    lower-is-better scores >= 0), a number ``s`` (``x / s``), or a pair ``[low, high]`` (linear map of ``low`` -> 0
    and ``high`` -> 1, clipped to [0, 1]; give ``[high_bad, low_good]`` reversed for a lower-is-better metric).
    Default: ``x / 100`` for MUSIQ, ``invert`` for metrics pyiqa marks ``lower_better``, else ``identity``.
    """
    if spec is None:
        if metric in DEFAULT_SCALES:
            spec = DEFAULT_SCALES[metric]
        else:
            spec = "invert" if lower_better else "identity"
    if spec == "identity":
        return lambda x: x
    if spec == "invert":
        return lambda x: 1.0 / (1.0 + x)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool) and spec != 0:
        return lambda x: x / float(spec)
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 2 and spec[0] != spec[1]:
        low, high = float(spec[0]), float(spec[1])
        return lambda x: min(1.0, max(0.0, (x - low) / (high - low)))
    raise ValueError(
        f"GenerationReward normalize[{metric!r}] = {spec!r}: use 'identity', 'invert', a non-zero number to divide "
        "by, or a [low, high] pair"
    )


def images_to_batch(images: list, device) -> torch.Tensor:
    """PIL images of one size -> ``(B, 3, H, W)`` float tensor in [0, 1] (as torchvision's ``to_tensor``)."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    return torch.from_numpy(arrays).to(device).permute(0, 3, 1, 2).float().div(255)


class GenerationReward(Reward):
    """(Weighted) mean of normalised no-reference pyiqa scores of a decoded image; ``None`` where there is none.

    Metrics are created once, by ``prepare(device)`` (the trainer calls it at start, so missing weights fail there,
    not at step 500) or on the first call. They are plain ``torch.nn.Module`` objects kept in a dict on this object,
    never submodules of the policy, so DeepSpeed ZeRO-3 does not partition them; create them outside any
    ``deepspeed.zero.Init`` context. Scoring runs under ``torch.no_grad``, batched over images of the same size.

    If a metric's weights are not on disk and the hub is unreachable (or ``HF_HUB_OFFLINE=1``), ``prepare`` raises
    ``MetricUnavailableError`` naming the metric and every file with the folder it must be placed in.

    Args:
        metrics: pyiqa metric names (``pyiqa.list_models(metric_mode="NR")``). Default: the paper's four.
        weights: ``None`` (equal), a list aligned with ``metrics``, or a dict metric -> weight.
        normalize: dict metric -> spec (see ``make_normalizer``); unlisted metrics use the default mapping:
            MUSIQ / 100, lower-is-better metrics ``1 / (1 + x)``, others unchanged (topiq_nr, maniqa-pipal and
            clipiqa already score in [0, 1]).
        device: device for the metrics; ``prepare(device)`` overrides it. Default: the current CUDA device, else CPU.
        image: which decoded image to score: ``"final"`` (default), ``"middle"`` or ``"rough"``.
    """

    name = "generation"

    def __init__(
        self,
        metrics: Sequence[str] = DEFAULT_METRICS,
        weights: Sequence[float] | dict[str, float] | None = None,
        normalize: dict | None = None,
        device=None,
        image: str = "final",
    ) -> None:
        super().__init__()
        if isinstance(metrics, str):
            metrics = [metrics]
        self.metrics = list(metrics)
        if not self.metrics:
            raise ValueError("GenerationReward needs at least one metric")
        if image not in STAGES:
            raise ValueError(f"GenerationReward image={image!r}; choose one of {STAGES}")
        self.image = image
        self.weights = self._weights(weights)
        self.normalize = dict(normalize or {})
        unknown = sorted(set(self.normalize) - set(self.metrics))
        if unknown:
            raise ValueError(f"GenerationReward normalize names metrics not in metrics={self.metrics}: {unknown}")
        self.device = device
        self.metric_models: dict[str, torch.nn.Module] = {}  # a plain dict: never registered as submodules
        self._normalizers: dict[str, Callable[[float], float]] = {}

    def _weights(self, weights) -> dict[str, float]:
        if weights is None:
            return {m: 1.0 for m in self.metrics}
        if isinstance(weights, dict):
            unknown = sorted(set(weights) - set(self.metrics))
            if unknown:
                raise ValueError(f"GenerationReward weights name metrics not in metrics={self.metrics}: {unknown}")
            weights = {m: float(weights.get(m, 1.0)) for m in self.metrics}
        else:
            weights = list(weights)
            if len(weights) != len(self.metrics):
                raise ValueError(
                    f"GenerationReward got {len(weights)} weights for {len(self.metrics)} metrics {self.metrics}"
                )
            weights = {m: float(w) for m, w in zip(self.metrics, weights)}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"GenerationReward weights must be >= 0 with a positive sum, got {weights}")
        return weights

    # ----- set-up ------------------------------------------------------------------------------------------------
    def prepare(self, device=None) -> None:
        """Create every metric on ``device`` (once; later calls only move them). Raises if one cannot be created."""
        if device is not None:
            self.device = device
        device = self._device()
        failures: list[MetricUnavailableError] = []
        for metric in self.metrics:
            if metric not in self.metric_models:
                try:
                    self.metric_models[metric] = create_metric(metric, device)
                except MetricUnavailableError as err:
                    failures.append(err)  # keep going: report every unavailable metric at once
                    continue
                self._normalizers[metric] = make_normalizer(
                    metric, self.normalize.get(metric), bool(self.metric_models[metric].lower_better)
                )
            self.metric_models[metric].to(device)
        if failures:
            message = "\n\n".join(str(err) for err in failures)
            raise MetricUnavailableError(message) from (failures[0].__cause__ or failures[0])

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ----- scoring -----------------------------------------------------------------------------------------------
    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        n = len(completions)
        images = [stages[self.image] for stages in stage_images(kwargs, n)]
        raw = self.raw_scores(images)
        scores: list[float | None] = []
        for i in range(n):
            if images[i] is None:
                scores.append(None)
                continue
            total = sum(self.weights[m] * self._normalizers[m](raw[m][i]) for m in self.metrics)
            scores.append(total / sum(self.weights.values()))
        for metric in self.metrics:
            if mean(raw.get(metric, [])) is not None:
                log_metric(kwargs, f"generation/{metric}", mean(raw[metric]))
        return scores

    @torch.no_grad()
    def raw_scores(self, images: list) -> dict[str, list[float | None]]:
        """Un-normalised score of every metric for every image (``None`` where the image is ``None``)."""
        if any(image is not None for image in images) and len(self.metric_models) < len(self.metrics):
            self.prepare()
        raw: dict[str, list[float | None]] = {m: [None] * len(images) for m in self.metrics}
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            if image is not None:
                by_size.setdefault(image.size, []).append(i)
        device = self._device()
        for indices in by_size.values():
            batch = images_to_batch([images[i] for i in indices], device)
            for metric in self.metrics:
                values = self.metric_models[metric](batch).detach().float().reshape(-1).cpu().tolist()
                if len(values) != len(indices):
                    raise RuntimeError(
                        f"pyiqa metric {metric!r} returned {len(values)} scores for {len(indices)} images"
                    )
                for i, value in zip(indices, values):
                    raw[metric][i] = value if math.isfinite(value) else math.nan
        return raw


def create_metric(metric: str, device, purpose: str = "the generation reward", **options) -> torch.nn.Module:
    """``pyiqa.create_metric`` (with metric ``options``) and clear errors for an unknown name, missing weights or a
    missing module; ``purpose`` says in the error what the metric was for."""
    import pyiqa

    available = pyiqa.list_models()
    if metric not in available:
        close = difflib.get_close_matches(metric, available, n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown pyiqa metric {metric!r}{hint} (see pyiqa.list_models(metric_mode='NR'))")
    files = weight_files(metric)
    required_missing = [f for f in files if not f.alternative and not f.present]
    alternatives = [f for f in files if f.alternative]
    if alternatives and not any(f.present for f in alternatives):
        required_missing += alternatives
    if required_missing and hub_offline():
        # HF_HUB_OFFLINE=1: do not let pyiqa try (its downloads ignore that variable and may hang without internet).
        raise MetricUnavailableError(missing_weights_error(metric, files, purpose=purpose))
    try:
        model = pyiqa.create_metric(metric, device=device, as_loss=False, **options)
    except Exception as err:
        raise MetricUnavailableError(missing_weights_error(metric, files, err, purpose)) from err
    return model.eval().requires_grad_(False)
