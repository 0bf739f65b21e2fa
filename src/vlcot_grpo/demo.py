"""The embedded default, end to end on a CPU, offline: tiny Emu3 → cold-start SFT → GRPO on the demo photos.

``make demo`` / ``vlcot-grpo demo`` / ``python -m vlcot_grpo.demo``. Extra arguments go to the GRPO recipe.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "tiny-emu3"


def _recipe(kind: str) -> Path:
    path = RECIPES / kind / "config_demo.yaml"
    if not path.exists():
        raise FileNotFoundError(f"demo recipe {path} not found: run the demo from a checkout of the repository")
    return path


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="vlcot-grpo demo",
        allow_abbrev=False,  # --max_steps etc. pass through to the GRPO recipe whole
        description="The embedded default, offline on a CPU: the tiny Emu3 (recipes/tiny-emu3), its cold-start SFT, "
        "then GRPO with LoRA on the bundled photos; everything lands under outputs/tiny-emu3/. Any other argument "
        "(e.g. --max_steps 4) overrides the GRPO recipe.",
    )
    argv = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))[1]
    start = time.perf_counter()
    from vlcot_grpo import sft

    policy = Path(sft.main(["--config", str(_recipe("sft"))]))  # a full model, also after a LoRA cold start
    print(f"[demo] cold start done in {time.perf_counter() - start:.0f} s: {policy}")

    from vlcot_grpo import grpo

    out = grpo.main(["--config", str(_recipe("grpo")), "--model_name_or_path", str(policy), *argv])
    print(f"[demo] finished in {time.perf_counter() - start:.0f} s")
    print(f"[demo] LoRA adapter:    {out}")
    print(f"[demo] reward plot:     {out / 'rewards.png'}")
    print(f"[demo] sample pictures: {out / 'samples'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
