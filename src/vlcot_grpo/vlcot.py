"""The Vision-Language Chain of Thought (VLCoT) format: seven blocks, their tags, the prompt and the parser.

A completion is one token sequence::

    <degradation> text </degradation>
    <rough_understand> text </rough_understand>   <rough_image> IMAGE </rough_image>
    <middle_understand> text </middle_understand> <middle_image> IMAGE </middle_image>
    <final_understand> text </final_understand>   <final_image> IMAGE </final_image>

Every tag is a single special token of the tokenizer, so block boundaries are found on token ids, never by
re-tokenising text. IMAGE is an image in the model backend's layout (see ``vlcot_grpo.models``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from vlcot_grpo.models import ImageTokenBackend

BLOCKS: tuple[str, ...] = (
    "degradation",
    "rough_understand",
    "rough_image",
    "middle_understand",
    "middle_image",
    "final_understand",
    "final_image",
)
IMAGE_BLOCKS: tuple[str, ...] = ("rough_image", "middle_image", "final_image")
TEXT_BLOCKS: tuple[str, ...] = tuple(b for b in BLOCKS if b not in IMAGE_BLOCKS)
STAGES: tuple[str, ...] = ("rough", "middle", "final")
TAGS: tuple[str, ...] = tuple(t for b in BLOCKS for t in (f"<{b}>", f"</{b}>"))

#: Placeholder in the prompt text where the low-quality image's tokens go.
IMAGE_PLACEHOLDER = "<|image|>"

#: The prompt of the paper (RealSR-R1), with the image placeholder.
DEFAULT_PROMPT = (
    "Perceive the degradation, understand the image content, and restore the high-quality image step by step "
    "(simulating the image restoration process from coarse to fine). The low-quality image is as follows: "
    f"{IMAGE_PLACEHOLDER}. The generation format should be as follows: "
    + " ".join(f"<{b}> ... </{b}>" for b in BLOCKS)
)


def open_tag(block: str) -> str:
    return f"<{block}>"


def close_tag(block: str) -> str:
    return f"</{block}>"


# ----- parsing ---------------------------------------------------------------------------------------------------


@dataclass
class Block:
    """One block found in a completion. ``start``/``end`` delimit its content in the token ids (tags excluded)."""

    name: str
    start: int
    end: int
    closed: bool = True
    text: str | None = None
    codes: object = None  # torch.LongTensor (rows, cols) for a well-formed image block
    image: Image.Image | None = None
    error: str | None = None


@dataclass
class VLCoTParse:
    """What a completion contains, and everything wrong with it. Never raised: bad outputs are data."""

    blocks: dict[str, Block] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """All seven blocks present, closed, in order, non-empty, images well-formed, nothing else wrong."""
        return not self.problems and all(b in self.blocks for b in BLOCKS)

    def text(self, block: str) -> str | None:
        b = self.blocks.get(block)
        return None if b is None or not b.closed else b.text

    def image(self, block: str):
        b = self.blocks.get(block)
        return None if b is None or not b.closed else b.image

    @property
    def texts(self) -> dict[str, str | None]:
        return {b: self.text(b) for b in TEXT_BLOCKS}

    @property
    def images(self) -> dict[str, Image.Image | None]:
        """Decoded images by stage name (``rough``/``middle``/``final``); None where missing or malformed."""
        return {s: self.image(f"{s}_image") for s in STAGES}


def _strip_trailing(ids: list[int], ignore: set[int]) -> list[int]:
    end = len(ids)
    while end and ids[end - 1] in ignore:
        end -= 1
    return ids[:end]


def parse_completion(
    backend: ImageTokenBackend,
    ids,
    stage_grids: dict[str, tuple[int, int]] | None = None,
    decode_images: bool = True,
) -> VLCoTParse:
    """Split completion token ids into the seven blocks; see ``parse_completions``."""
    return parse_completions(backend, [ids], stage_grids, decode_images)[0]


def parse_completions(
    backend: ImageTokenBackend,
    batch,
    stage_grids: dict[str, tuple[int, int]] | None = None,
    decode_images: bool = True,
) -> list[VLCoTParse]:
    """Parse a batch of completions (lists or tensors of token ids, padding/EOS at the end ignored).

    ``stage_grids`` maps ``rough``/``middle``/``final`` to the expected code grid; an image of another size is then
    malformed. Well-formed images are decoded to PIL in one VQ call per grid size when ``decode_images``.
    """
    tag_ids = backend.tag_ids
    opener = {tag_ids[open_tag(b)]: b for b in BLOCKS}
    closer = {tag_ids[close_tag(b)]: b for b in BLOCKS}
    ignore = {i for i in (backend.tokenizer.pad_token_id, backend.eos_token_id) if i is not None}
    parses = [_parse_one(backend, _as_list(ids), opener, closer, ignore, stage_grids or {}) for ids in batch]
    if decode_images:
        _decode_all(backend, parses)
    return parses


def _as_list(ids) -> list[int]:
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def _read_block(backend, block: Block, content: list[int], stage_grids, problems: list[str]) -> None:
    """Fill ``block`` from its tokens: an image block's codes (checked against its stage's grid), a text block's
    text; what is wrong goes to ``problems``."""
    if block.name in IMAGE_BLOCKS:
        stage = block.name.removesuffix("_image")
        result = backend.parse_image_tokens(content, stage_grids.get(stage))
        block.codes, block.error = result.codes, result.error
        if result.error:
            problems.append(f"<{block.name}> malformed: {result.error}")
        return
    invalid = sum(not 0 <= t < backend.vocab_size for t in content)
    if invalid:  # decode_text leaves them out
        problems.append(f"<{block.name}> holds {invalid} out-of-vocabulary ids")
    block.text = backend.decode_text(content).strip()
    if not block.text:
        block.error = "empty"
        problems.append(f"<{block.name}> is empty")


def _parse_one(backend, ids, opener, closer, ignore, stage_grids) -> VLCoTParse:
    ids = _strip_trailing(ids, ignore)
    parse = VLCoTParse()
    current: Block | None = None
    stray = 0
    for pos, tok in enumerate(ids):
        if current is not None and current.name in IMAGE_BLOCKS and tok not in closer:
            continue  # image content is checked as a whole below
        if tok in opener:
            name = opener[tok]
            if current is not None:
                parse.problems.append(f"<{name}> opened inside unclosed <{current.name}>")
                current.closed, current.end = False, pos
            if name in parse.blocks:
                parse.problems.append(f"<{name}> appears more than once; the first is used")
                current = Block(name, pos + 1, pos + 1)  # parsed, then dropped
                current.error = "duplicate"
                continue
            current = Block(name, pos + 1, pos + 1)
            parse.blocks[name] = current
        elif tok in closer:
            name = closer[tok]
            if current is None or current.name != name:
                parse.problems.append(f"</{name}> without a matching <{name}>")
                continue
            current.end = pos
            current = None
        elif current is None and tok not in ignore:
            stray += 1
    if current is not None:
        current.closed, current.end = False, len(ids)
        parse.problems.append(f"<{current.name}> is not closed (completion ends inside it)")
    if stray:
        parse.problems.append(f"{stray} tokens outside any block")

    for block in parse.blocks.values():
        _read_block(backend, block, ids[block.start : block.end], stage_grids, parse.problems)
    missing = [b for b in BLOCKS if b not in parse.blocks]
    if missing:
        parse.problems.append("missing blocks: " + ", ".join(f"<{b}>" for b in missing))
    found = sorted(parse.blocks.values(), key=lambda b: b.start)
    order = [b.name for b in found]
    if order != [b for b in BLOCKS if b in parse.blocks]:
        parse.problems.append("blocks out of order: " + " ".join(f"<{b}>" for b in order))
    return parse


def _decode_all(backend, parses: list[VLCoTParse]) -> None:
    by_grid: dict[tuple[int, int], list[Block]] = {}
    for parse in parses:
        for block in parse.blocks.values():
            if block.codes is not None:
                by_grid.setdefault(tuple(block.codes.shape), []).append(block)
    for blocks in by_grid.values():
        images = backend.decode_codes(torch.stack([b.codes for b in blocks]))
        for block, image in zip(blocks, images):
            block.image = image


def build_completion_ids(
    backend: ImageTokenBackend, texts: dict[str, str], codes: dict[str, object], eos: bool = True
) -> list[int]:
    """Token ids of a well-formed completion from block texts and stage code grids (tests, cold-start traces)."""
    ids: list[int] = []
    for block in BLOCKS:
        ids.append(backend.tag_ids[open_tag(block)])
        if block in IMAGE_BLOCKS:
            ids.extend(backend.codes_to_token_ids(codes[block.removesuffix("_image")]).tolist())
        else:
            ids.extend(backend.encode_text(texts[block]))
        ids.append(backend.tag_ids[close_tag(block)])
    if eos and backend.eos_token_id is not None:
        ids.append(backend.eos_token_id)
    return ids


def encode_prompt(
    backend: ImageTokenBackend, lr_image: Image.Image, lr_size: tuple[int, int], prompt: str = DEFAULT_PROMPT
) -> list[int]:
    """Token ids of the prompt: BOS, the instruction text with the low-quality image's tokens at the placeholder, and
    the family's end of turn (``prompt_suffix_ids``).

    The image is resized to ``lr_size`` (height, width) before tokenisation (the paper: 512x512).
    """
    if prompt.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(
            f"the prompt must contain the image placeholder {IMAGE_PLACEHOLDER!r} exactly once: {prompt!r}"
        )
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    codes = backend.encode_images([lr_image], lr_size)[0]
    image_ids = backend.codes_to_token_ids(codes).tolist()
    text = backend.encode_text(before) + image_ids + backend.encode_text(after)
    return backend.bos_token_ids + text + backend.prompt_suffix_ids


def stage_sizes_of(config) -> dict[str, tuple[int, int]]:
    """``{"rough": (side, side), "middle": ..., "final": ...}`` from a config's ``rough_size``, ``middle_size`` and
    ``final_size`` (pixels; square images)."""
    return {stage: (getattr(config, f"{stage}_size"),) * 2 for stage in STAGES}


def min_completion_tokens(backend: ImageTokenBackend, stage_sizes: dict[str, tuple[int, int]]) -> int:
    """Fewest tokens a complete chain can take at these stage sizes (pixels): the three images in the backend's
    layout, the 14 tags and EOS, with every text block one token long. A length limit below this cuts every chain."""
    images = sum(len(backend.image_template(*backend.grid_for(*stage_sizes[s]))) for s in STAGES)
    return images + len(TAGS) + len(TEXT_BLOCKS) + 1
