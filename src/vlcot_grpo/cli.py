"""``vlcot-grpo``: one console entry, one sub-command per job.

vlcot-grpo convert --model DIR --vq FILE --out DST     Lumina-mGPT / PURE + LlamaGen VQ-8 -> one folder
vlcot-grpo prepare --model SRC --out DST                once per real checkpoint: the VLCoT tags become tokens
vlcot-grpo prepare-data --hr-dir DIR --out DIR [...]    build a VLCoT dataset from HR photos
vlcot-grpo sft --config recipes/<model>/sft/<name>.yaml   cold-start SFT on VLCoT traces
vlcot-grpo grpo --config recipes/<model>/grpo/<name>.yaml GRPO with VLCoT rollouts
vlcot-grpo upscale --model DIR --input DIR --out DIR    upscale images with a trained model
vlcot-grpo evaluate --sr-dir DIR --hr-dir DIR           score upscaled images against HR references
vlcot-grpo demo                                         the embedded default: tiny model, demo photos, CPU
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("convert", "prepare", "prepare-data", "sft", "grpo", "upscale", "evaluate", "demo")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "convert":
        from vlcot_grpo.models.convert import main as convert_main

        return convert_main(rest)
    if command == "prepare":
        from vlcot_grpo.models.prepare import add_prepare_arguments, run_prepare

        parser = argparse.ArgumentParser(prog="vlcot-grpo prepare", description="Add the VLCoT tags to a checkpoint.")
        add_prepare_arguments(parser)
        return run_prepare(parser.parse_args(rest))
    if command == "prepare-data":
        from vlcot_grpo.data.cli import add_prepare_data_arguments, run_prepare_data

        parser = argparse.ArgumentParser(prog="vlcot-grpo prepare-data")
        add_prepare_data_arguments(parser)
        return run_prepare_data(parser.parse_args(rest))
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
        from vlcot_grpo.inference import evaluate_main

        return evaluate_main(rest)
    from vlcot_grpo.demo import main as demo_main

    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
