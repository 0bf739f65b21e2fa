"""Format reward: did the completion follow the seven-block VLCoT layout?"""

from __future__ import annotations

from vlcot_grpo.vlcot import BLOCKS, VLCoTParse

from .base import Reward, column, require_any


class FormatReward(Reward):
    """1.0 when the completion is a complete VLCoT (``parse.complete``), else 0.0.

    Complete means: all seven blocks present, each closed, in order, non-empty, every image block a well-formed image
    of its stage's expected size, and nothing outside the blocks (see ``vlcot_grpo.vlcot.parse_completions``).

    Args:
        partial_credit: when True, score the fraction of the seven blocks that are right instead of all-or-nothing.
            A block is right when it is present, closed, well-formed (text non-empty; image parsed at the expected
            size) and in its place: it comes after every right block that precedes it in the format. A complete
            completion still scores exactly 1.0.
    """

    name = "format"

    def __init__(self, partial_credit: bool = False) -> None:
        super().__init__()
        self.partial_credit = bool(partial_credit)

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        require_any(kwargs, ("vlcot",))
        parses = column(kwargs, "vlcot", len(completions))
        return [self.score(parse) for parse in parses]

    def score(self, parse: VLCoTParse | None) -> float:
        if parse is None:
            return 0.0
        if parse.complete:
            return 1.0
        if not self.partial_credit:
            return 0.0
        return right_blocks(parse) / len(BLOCKS)


def right_blocks(parse: VLCoTParse) -> int:
    """How many of the seven blocks are present, closed, well-formed and in order."""
    count = 0
    last_start = -1
    for name in BLOCKS:
        block = parse.blocks.get(name)
        if block is None or not block.closed or block.error is not None:
            continue
        if name.endswith("_image") and block.codes is None:
            continue
        # In order: after the previous right block. A block written too early does not count.
        if block.start <= last_start:
            continue
        count += 1
        last_start = block.start
    return count
