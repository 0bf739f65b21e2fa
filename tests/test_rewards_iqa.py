"""The generation reward's start-up check: missing pyiqa weights fail at ``prepare`` with the exact file and folder.

Nothing here may download: the machine may have no internet (a real attempt can hang), so TORCH_HOME points at an
empty folder and pyiqa's download function is replaced by one that records the request and fails at once.
"""

from __future__ import annotations

import os

import pytest

from vlcot_grpo.rewards import DEFAULT_METRICS, GenerationReward, MetricUnavailableError, weight_files


class DownloadRefused(ConnectionError):
    pass


@pytest.fixture
def empty_weights_cache(tmp_path, monkeypatch):
    """An empty torch hub folder, and pyiqa's downloader replaced by one that records and refuses."""
    import pyiqa.utils.download_util as download_util
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # where timm backbones are looked up
    # pyiqa fixes its cache folder when it is imported, so point that at the empty folder too.
    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(tmp_path / "torch" / "hub" / "pyiqa"))
    requests: list[tuple[str, str]] = []

    def refuse(url, destination, *args, **kwargs):
        requests.append((url, destination))
        raise DownloadRefused(f"no network in tests: {url}")

    monkeypatch.setattr(download_util, "download_url_to_file", refuse)
    return tmp_path / "torch" / "hub", requests


def test_default_metrics_fail_at_prepare_naming_every_file_and_folder(empty_weights_cache):
    hub, requests = empty_weights_cache
    reward = GenerationReward(device="cpu")  # the paper's four metrics
    with pytest.raises(MetricUnavailableError) as info:
        reward.prepare("cpu")
    message = str(info.value)
    assert requests == []  # offline (HF_HUB_OFFLINE=1): nothing was even attempted
    for metric in DEFAULT_METRICS:
        assert f"cannot create the pyiqa metric {metric!r}" in message
        files = weight_files(metric)
        assert files, metric
        for file in files:
            assert file.file_name in message and file.folder in message
            assert not file.present
    assert f"folder {hub / 'pyiqa'}" in message  # pyiqa's own checkpoints
    assert f"folder {hub / 'clip'}" in message  # CLIPIQA's backbone
    assert "timm/resnet50" in message and "timm/vit_base_patch8_224" in message  # timm backbones, HF cache
    assert f"in the HF cache {hub.parent.parent / 'hf'}" in message


def test_the_named_file_is_the_one_pyiqa_tries_to_download(empty_weights_cache, monkeypatch):
    _, requests = empty_weights_cache
    monkeypatch.delenv("HF_HUB_OFFLINE")  # let pyiqa try: the refusing downloader stops it at once
    with pytest.raises(MetricUnavailableError) as info:
        GenerationReward(metrics=("musiq",), device="cpu").prepare()
    assert len(requests) == 1
    url, destination = requests[0]
    folder, file_name = os.path.split(destination)
    message = str(info.value)
    assert f"file {file_name} in folder {folder} [MISSING] (download: {url})" in message
    assert "DownloadRefused" in message
    assert isinstance(info.value.__cause__, DownloadRefused)


def test_metrics_that_need_no_weights_are_created_once(empty_weights_cache):
    reward = GenerationReward(metrics=("entropy", "piqe"), device="cpu")
    reward.prepare()
    models = dict(reward.metric_models)
    reward.prepare("cpu")
    assert reward.metric_models == models  # not re-created
    assert all(not any(p.requires_grad for p in m.parameters()) for m in models.values())
    assert weight_files("entropy") == [] and weight_files("psnr") == []


def test_unknown_metric_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown pyiqa metric 'musiqq'; did you mean 'musiq'"):
        GenerationReward(metrics=("musiqq",), device="cpu").prepare()
