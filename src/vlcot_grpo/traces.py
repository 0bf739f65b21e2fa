"""Cold-start traces: one sample of a VLCoT dataset -> the token sequence the model should learn to write.

A trace is a prompt (BOS, instruction, the low-quality image's tokens) and a completion with all seven blocks::

    <degradation> degradation_text </degradation>
    <rough_understand> ROUGH TEXT </rough_understand>   <rough_image> target_rough </rough_image>
    <middle_understand> MIDDLE TEXT </middle_understand> <middle_image> target_middle </middle_image>
    <final_understand> FINAL TEXT </final_understand>   <final_image> target_final </final_image> EOS

The three understanding texts (see :func:`understanding_texts`):

* rough: the sample's ``caption``; where it is empty, ``"This image shows "`` + its tags + ``"."`` (``"This image
  shows rocket, tower and sky."``), or ``"This image shows a natural scene."`` with no tags either. The paper's
  understanding reward looks for the tags in this block, so the fallback names them all.
* middle: ``"Restore the shapes and edges of "`` + the subject + ``"."``;
* final: ``"Restore the fine textures and details of "`` + the subject + ``"."``,

where the subject is the tags joined in English (``"rocket, tower and sky"``), or ``"the scene"`` with no tags. The
paper describes each stage with a VLM; these templates only teach the model the stage structure (coarse shapes, then
fine detail) without inventing content the sample does not carry. Whitespace in every text is collapsed to single
spaces, since the parser strips it anyway.

The prompt is the row's ``prompt`` column where present (as in GRPO), else the ``prompt`` argument, else
``vlcot.DEFAULT_PROMPT``. Images are VQ-encoded at the requested sizes; the targets are resized if they differ.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import datasets

from vlcot_grpo.vlcot import DEFAULT_PROMPT, STAGES, build_completion_ids, encode_prompt

if TYPE_CHECKING:  # pragma: no cover
    from vlcot_grpo.models import ImageTokenBackend

logger = logging.getLogger(__name__)

ROUGH_FALLBACK = "This image shows {subject}."
ROUGH_FALLBACK_NO_TAGS = "This image shows a natural scene."
MIDDLE_TEMPLATE = "Restore the shapes and edges of {subject}."
FINAL_TEMPLATE = "Restore the fine textures and details of {subject}."
NO_TAGS_SUBJECT = "the scene"

#: Dataset columns a trace is built from.
REQUIRED_COLUMNS: tuple[str, ...] = ("lr_image", "degradation_text", *(f"target_{s}" for s in STAGES))


def _clean(text: str | None) -> str:
    return " ".join((text or "").split())


def _tag_list(tags) -> list[str]:
    """Tags as a list of clean non-empty strings; a comma-separated string is accepted too."""
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = tags.split(",")
    return [t for t in (_clean(str(tag)) for tag in tags) if t]


def _join_english(words: Sequence[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def understanding_texts(caption: str | None, tags) -> dict[str, str]:
    """The three understanding texts of a sample, from its caption and tags (rules in the module docstring)."""
    tags = _tag_list(tags)
    subject = _join_english(tags) if tags else NO_TAGS_SUBJECT
    rough = _clean(caption)
    if not rough:
        rough = ROUGH_FALLBACK.format(subject=subject) if tags else ROUGH_FALLBACK_NO_TAGS
    return {
        "rough_understand": rough,
        "middle_understand": MIDDLE_TEMPLATE.format(subject=subject),
        "final_understand": FINAL_TEMPLATE.format(subject=subject),
    }


def trace_texts(row: dict, where: str = "sample") -> dict[str, str]:
    """The four text blocks of a sample's trace. ``where`` names the sample in errors."""
    degradation = _clean(row.get("degradation_text"))
    if not degradation:
        raise ValueError(f"{where}: 'degradation_text' is empty; every trace needs a <degradation> block")
    return {"degradation": degradation, **understanding_texts(row.get("caption"), row.get("tags"))}


def _square(size) -> tuple[int, int]:
    """An ``int`` side or a ``(height, width)`` pair -> ``(height, width)``."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _check_columns(column_names: Sequence[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in column_names]
    if missing:
        raise ValueError(
            f"the dataset lacks the column(s) {missing} needed to build VLCoT traces; it has {list(column_names)}. "
            "Build it with vlcot_grpo.data (build_vlcot_dataset or the demo)."
        )


def _warn_if_not_round_trip(backend: ImageTokenBackend, texts: dict[str, str], where: str) -> None:
    """A text the tokenizer cannot write back (e.g. characters it maps to <unk>) would teach the model <unk>."""
    for block, text in texts.items():
        if backend.decode_text(backend.encode_text(text)).strip() != text:
            logger.warning("%s: the tokenizer does not reproduce the <%s> text %r exactly", where, block, text)


def _build_traces(
    backend: ImageTokenBackend,
    rows: list[dict],
    lr_size: tuple[int, int],
    stage_sizes: dict[str, tuple[int, int]],
    prompt: str | None,
    first_index: int,
) -> list[dict[str, list[int]]]:
    """Traces of a batch of rows, with one VQ-encoder call per image kind (LR, rough, middle, final)."""
    if not rows:
        return []
    _check_columns(list(rows[0]))
    codes = {
        stage: backend.encode_images([row[f"target_{stage}"] for row in rows], _square(stage_sizes[stage]))
        for stage in STAGES
    }
    traces = []
    for i, row in enumerate(rows):
        where = f"sample {first_index + i}"
        texts = trace_texts(row, where)
        _warn_if_not_round_trip(backend, texts, where)
        instruction = row.get("prompt") or prompt or DEFAULT_PROMPT
        traces.append(
            {
                "prompt_ids": encode_prompt(backend, row["lr_image"], lr_size, instruction),
                "completion_ids": build_completion_ids(backend, texts, {s: codes[s][i] for s in STAGES}),
            }
        )
    return traces


def build_trace(
    backend: ImageTokenBackend,
    row: dict,
    lr_size: int | tuple[int, int],
    stage_sizes: dict[str, int | tuple[int, int]],
    prompt: str | None = None,
) -> dict[str, list[int]]:
    """The trace of one dataset row: ``{"prompt_ids": [...], "completion_ids": [...]}``.

    ``lr_size`` is the side (or ``(height, width)``) the LR image is tokenised at; ``stage_sizes`` maps ``rough``,
    ``middle`` and ``final`` to the sizes of the target images. ``prompt`` is used where the row has no ``prompt``.
    """
    sizes = {s: _square(stage_sizes[s]) for s in STAGES}
    return _build_traces(backend, [row], _square(lr_size), sizes, prompt, first_index=0)[0]


def build_trace_dataset(
    backend: ImageTokenBackend,
    dataset: datasets.Dataset,
    lr_size: int | tuple[int, int],
    stage_sizes: dict[str, int | tuple[int, int]],
    prompt: str | None = None,
    batch_size: int = 16,
) -> datasets.Dataset:
    """Traces of every row of ``dataset`` as a ``datasets.Dataset`` with columns ``prompt_ids``, ``completion_ids``.

    Images are VQ-encoded ``batch_size`` rows at a time. Arguments as in :func:`build_trace`.
    """
    _check_columns(dataset.column_names)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    missing = [s for s in STAGES if s not in stage_sizes]
    if missing:
        raise ValueError(f"stage_sizes lacks {missing}; it needs rough, middle and final")
    sizes = {s: _square(stage_sizes[s]) for s in STAGES}
    lr = _square(lr_size)
    traces: list[dict[str, list[int]]] = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]  # dict of columns
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        traces.extend(_build_traces(backend, rows, lr, sizes, prompt, first_index=start))
    return datasets.Dataset.from_dict(
        {"prompt_ids": [t["prompt_ids"] for t in traces], "completion_ids": [t["completion_ids"] for t in traces]}
    )
