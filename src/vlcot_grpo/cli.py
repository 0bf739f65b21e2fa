"""``vlcot-grpo``: one console entry, one sub-command per job (``COMMANDS``); ``vlcot-grpo COMMAND --help`` tells
each one's options and never runs it."""

from __future__ import annotations

import difflib
import sys

#: sub-command -> (usage, what it does); the help and the README list these
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("--model DIR --vq FILE --out DST", "Lumina-mGPT / PURE + LlamaGen VQ-8 -> one folder"),
    "prepare": ("--model SRC --out DST", "once per real checkpoint: the VLCoT tags become tokens"),
    "prepare-data": ("--hr-dir DIR --out DIR [...]", "build a VLCoT dataset from HR photos (optionally tagged)"),
    "sft": ("--config recipes/<model>/sft/<name>.yaml", "cold-start SFT on VLCoT traces"),
    "grpo": ("--config recipes/<model>/grpo/<name>.yaml", "GRPO with VLCoT rollouts"),
    "upscale": ("--model DIR --input DIR --out DIR", "upscale images with a trained model or adapter"),
    "evaluate": ("--sr-dir DIR --hr-dir DIR", "score upscaled images against HR references"),
    "demo": ("[GRPO overrides]", "the embedded default: tiny model, demo photos, CPU"),
}


def help_text() -> str:
    width = max(len(f"{name} {usage}") for name, (usage, _) in COMMANDS.items())
    lines = [f"  vlcot-grpo {f'{name} {usage}':<{width}}  {what}" for name, (usage, what) in COMMANDS.items()]
    return (
        "usage: vlcot-grpo COMMAND [options]\n\nGRPO with a Vision-Language Chain of Thought for real-world image "
        "super-resolution.\n\ncommands:\n" + "\n".join(lines) + "\n\n`vlcot-grpo COMMAND --help` lists a command's "
        "options (sft and grpo: every recipe key)."
    )


def _run(command: str, rest: list[str]) -> int:
    import argparse

    if command == "convert":
        from vlcot_grpo.models.convert import main as convert_main

        return convert_main(rest)
    if command == "prepare":
        from vlcot_grpo.models.prepare import add_prepare_arguments, run_prepare

        parser = argparse.ArgumentParser(prog="vlcot-grpo prepare", description="Add the VLCoT tags to a checkpoint.")
        add_prepare_arguments(parser)
        return run_prepare(parser.parse_args(rest))
    if command == "prepare-data":
        from vlcot_grpo.data.cli import main as prepare_data_main

        return prepare_data_main(rest)
    if command == "sft":
        from vlcot_grpo.sft import main as sft_main

        sft_main(rest)
        return 0
    if command == "grpo":
        from vlcot_grpo.grpo import main as grpo_main

        grpo_main(rest)
        return 0
    if command == "upscale":
        from vlcot_grpo.inference import upscale_main

        return upscale_main(rest)
    if command == "evaluate":
        from vlcot_grpo.evaluation import evaluate_main

        return evaluate_main(rest)
    from vlcot_grpo.demo import main as demo_main

    return demo_main(rest)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"{help_text()}\n\nvlcot-grpo: error: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        return 2
    return _run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
