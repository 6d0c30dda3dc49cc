"""``lorasynth`` entry point: builds the argparse tree from the command modules.

Each command module exposes ``register(subparsers)`` and sets ``func`` on its parser.
A LorasynthError (a user mistake or bad input) prints one line and exits 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lorasynth import __version__
from lorasynth.errors import LorasynthError
from lorasynth.apps.cli.helpfmt import apply_formatter, examples

# command modules, in help order
COMMAND_MODULES = ["lora_files", "generate", "faces", "library", "library_train", "library_merge", "models", "demo",
                   "serve", "comfyui"]


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``lorasynth: error: serve: argument --port: ... (see --help)``.

    Every sub-parser is one too (argparse makes sub-parsers of the parent's class).
    """

    def error(self, message: str):
        command = self.prog.removeprefix("lorasynth").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"lorasynth: error: {where}{message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lorasynth",
        description="Zero-shot LoRA synthesis for Stable Diffusion: library, compression, synthesis, blending, apply.\n"
                    "`lorasynth COMMAND --help` describes each command, with examples.",
        epilog=examples("lorasynth synthesize --face me.jpg --model org/w2w-dlib -o me.safetensors",
                        "lorasynth inspect me.safetensors",
                        "lorasynth blend me.safetensors=0.8 style.safetensors=0.4 -o mix.safetensors"),
    )
    parser.add_argument("--version", action="version", version=f"lorasynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:  # a command group not built yet
            if e.name == f"{__package__}.{name}":
                continue
            raise
        module.register(sub)
    apply_formatter(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except LorasynthError as e:
        print(f"lorasynth: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorasynth: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
