"""Datasets built by an older labelling: recompute their degradation levels, or say which rows could not be.

A prepared dataset carries ``label_version`` (:data:`~vlcot_grpo.data.levels.LABEL_VERSION`) in every row since
label version 2; one without the column was labelled by version 1, whose levels often disagree with what the LR
image shows (docs/rewards.md). :func:`upgrade_labels` brings such a dataset up to date in memory, from what every
row already stores: the record (``degradation_params``) gives blur, downsample, compression and upsample, and the
replay of that record on the stored ``hr_image`` gives the residual noise. The replay is also checked against the
stored ``lr_image``: a difference means the LR was made by other code than this pipeline's, and is reported.
Rows without a readable record keep their old levels and version, with a warning; nothing is changed silently.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vlcot_grpo.data.degradations import DegradationRecord, apply_degradation_with_residual_noise
from vlcot_grpo.data.levels import LABEL_VERSION, STEPS, LevelThresholds, label_columns

if TYPE_CHECKING:  # pragma: no cover
    import datasets

logger = logging.getLogger(__name__)

#: Label version of a dataset without the ``label_version`` column.
UNVERSIONED_LABEL_VERSION = 1
_LABEL_COLUMNS = ("degradation_levels", "degradation_text", "degradation_measures", "label_version")


class LabelVersionWarning(UserWarning):
    """A dataset's degradation levels were recomputed, or could not be, because they came from an older labelling."""


def label_versions(dataset: datasets.Dataset) -> list[int]:
    """Every row's label version (:data:`UNVERSIONED_LABEL_VERSION` for a dataset without the column)."""
    if "label_version" not in dataset.column_names:
        return [UNVERSIONED_LABEL_VERSION] * len(dataset)
    return [UNVERSIONED_LABEL_VERSION if v is None else int(v) for v in dataset["label_version"]]


def _image(value: Any) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    return None


def _relabel_row(row: dict[str, Any], thresholds: LevelThresholds) -> tuple[dict[str, Any] | None, str | None, bool]:
    """(new label columns, or None; why not; whether the replay reproduced the stored LR)."""
    try:
        record = DegradationRecord.from_json(row["degradation_params"])
    except (TypeError, ValueError, KeyError, json.JSONDecodeError) as error:
        return None, f"unreadable degradation_params ({error})", False
    hr = _image(row.get("hr_image"))
    if hr is None:
        return None, "no hr_image to replay the noise on", False
    try:
        lr, noise = apply_degradation_with_residual_noise(hr, record)
    except ValueError as error:
        return None, f"the record does not replay on hr_image ({error})", False
    stored = _image(row.get("lr_image"))
    reproduced = stored is not None and np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(lr))
    return label_columns(record, noise, thresholds), None, reproduced


def upgrade_labels(
    dataset: datasets.Dataset, thresholds: LevelThresholds | None = None, name: str = "the dataset"
) -> datasets.Dataset:
    """``dataset`` with the levels of rows labelled by an older version recomputed (see the module docstring).

    A dataset whose rows are all at :data:`LABEL_VERSION`, or that has no ``degradation_params`` (not made by
    ``prepare-data``), comes back unchanged. Otherwise every older row gets new ``degradation_levels``,
    ``degradation_text``, ``degradation_measures`` and ``label_version`` (the columns are added if missing), and a
    :class:`LabelVersionWarning` says how many rows were recomputed, how many could not be (they keep their
    stored levels and version) and whether the replays reproduced the stored LR images. ``thresholds``: default
    :class:`LevelThresholds` (a version-1 dataset does not record the thresholds it was built with). A row at a
    version newer than this code's is an error. ``name`` names the dataset in the messages.
    """
    if "degradation_params" not in dataset.column_names or len(dataset) == 0:
        return dataset
    versions = label_versions(dataset)
    newer = sorted({v for v in versions if v > LABEL_VERSION})
    if newer:
        raise ValueError(
            f"{name} has rows at label version {newer[-1]}, newer than this vlcot-grpo's {LABEL_VERSION}: "
            "update vlcot-grpo, or rebuild the dataset with `vlcot-grpo prepare-data`"
        )
    old = [i for i, v in enumerate(versions) if v < LABEL_VERSION]
    if not old:
        return dataset
    thresholds = thresholds or LevelThresholds()
    values = _stored_label_values(dataset, versions)
    outcome = _recompute_rows(dataset, old, thresholds, values)
    _warn_about_the_upgrade(name, sorted({versions[i] for i in old}), len(old), outcome, thresholds)
    return _with_label_columns(dataset, values)


@dataclass
class _RelabelOutcome:
    recomputed: int = 0
    not_reproduced: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # why a row could not be recomputed -> how many


def _stored_label_values(dataset: datasets.Dataset, versions: list[int]) -> dict[str, list]:
    """The label columns as stored, by name; a column the dataset lacks comes as a list of placeholders."""

    def stored(column: str, missing: Any) -> list:
        return list(dataset[column]) if column in dataset.column_names else [missing] * len(dataset)

    return {
        "degradation_levels": stored("degradation_levels", None),
        "degradation_text": stored("degradation_text", ""),
        "degradation_measures": stored("degradation_measures", None),
        "label_version": list(versions),
    }


def _recompute_rows(
    dataset: datasets.Dataset, rows: list[int], thresholds: LevelThresholds, values: dict[str, list]
) -> _RelabelOutcome:
    """Recompute the label columns of ``rows`` into ``values`` (in place); rows that cannot be keep theirs."""
    import datasets

    needed = [c for c in ("degradation_params", "hr_image", "lr_image") if c in dataset.column_names]
    source = dataset.select_columns(needed)
    for column in ("hr_image", "lr_image"):
        if column in needed and isinstance(source.features[column], datasets.Image):
            source = source.cast_column(column, datasets.Image(decode=False))
    outcome = _RelabelOutcome()
    for i in rows:
        columns, reason, reproduced = _relabel_row(source[i], thresholds)
        if columns is None:
            outcome.failures[reason] = outcome.failures.get(reason, 0) + 1
            continue
        outcome.recomputed += 1
        outcome.not_reproduced += not reproduced
        for column in _LABEL_COLUMNS:
            values[column][i] = columns[column]
    return outcome


def _warn_about_the_upgrade(
    name: str, from_versions: list[int], old_rows: int, outcome: _RelabelOutcome, thresholds: LevelThresholds
) -> None:
    message = [
        f"{name} was labelled by label version {', '.join(map(str, from_versions))} (before effective measures): "
        f"recomputed the degradation levels of {outcome.recomputed} of its {old_rows} older rows from their "
        f"records and HR images (label version {LABEL_VERSION}, "
        f"{'default' if thresholds == LevelThresholds() else 'given'} "
        "thresholds); rebuild it with `vlcot-grpo prepare-data` to store them"
    ]
    if outcome.not_reproduced:
        message.append(
            f"{outcome.not_reproduced} replays did not reproduce the stored lr_image (made by other code?): their "
            "noise level is that of this pipeline's replay"
        )
    for reason, count in sorted(outcome.failures.items()):
        message.append(f"{count} rows keep their label version 1 levels: {reason}")
    # stacklevel 3: the warning points at upgrade_labels' caller, as it did before this helper existed.
    warnings.warn("; ".join(message), LabelVersionWarning, stacklevel=3)
    logger.warning("; ".join(message))


def _with_label_columns(dataset: datasets.Dataset, values: dict[str, list]) -> datasets.Dataset:
    """``dataset`` with its label columns replaced by ``values``, in prepare-data's column order."""

    from vlcot_grpo.data.dataset import dataset_features

    # Empty measures (rows that kept old levels) must still fit the struct type.
    for column in ("degradation_measures", "degradation_levels"):
        values[column] = [m if m is not None else dict.fromkeys(STEPS) for m in values[column]]
    present = [c for c in _LABEL_COLUMNS if c in dataset.column_names]
    upgraded = dataset.remove_columns(present) if present else dataset
    features = dataset_features()
    for column in _LABEL_COLUMNS:
        upgraded = upgraded.add_column(column, values[column], feature=features[column])
    # The columns in prepare-data's order, any others after them.
    canonical = [c for c in dataset_features() if c in upgraded.column_names]
    return upgraded.select_columns(canonical + [c for c in upgraded.column_names if c not in canonical])
