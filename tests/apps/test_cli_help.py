"""CLI help (every command: description, examples, shown defaults, named positionals) and a
cheap start: `--help` imports no torch; the file commands import neither Lightning nor diffusers."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from lorasynth.apps.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for every runnable command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, path + (name,))


def test_every_command_has_a_description_an_example_defaults_and_named_positionals():
    leaves = list(_leaves(build_parser()))
    assert len(leaves) >= 20
    for path, p in leaves:
        cmd = " ".join(path)
        text = p.format_help()
        assert p.description and len(p.description) > 20, cmd
        assert p.epilog and p.epilog.startswith("examples:") and f"lorasynth {cmd}" in p.epilog, cmd
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"{cmd}: {a.option_strings or a.dest} has no help"
            if not a.option_strings:  # a positional: an upper-case name and what it is
                assert a.metavar and a.metavar.upper() == a.metavar and len(a.metavar) > 1, f"{cmd}: {a.dest}"
            elif a.default is not None and not isinstance(a.default, bool) and a.default not in ("", []):
                assert "default" in a.help or f"(default: {a.default})" in " ".join(text.split()), \
                    f"{cmd}: {a.option_strings} hides its default"
    generate = dict(leaves)[("generate",)]
    scheduler = next(a for a in generate._actions if "--scheduler" in a.option_strings)
    assert tuple(scheduler.choices) == ("dpm", "euler", "lcm", "ddim")


def test_spelled_out_choice_lists_match_the_library():
    """The CLI spells these out (so --help imports nothing heavy); they must not drift."""
    from lorasynth.apps.cli import faces as cli_faces, generate as cli_generate, lora_files
    from lorasynth.faces import EMBEDDER_NAMES
    from lorasynth.formats import SAVE_FORMATS
    from lorasynth.runtime.pipeline import SCHEDULERS

    assert tuple(cli_faces.EMBEDDER_NAMES) == tuple(EMBEDDER_NAMES)
    assert tuple(lora_files.SAVE_FORMATS) == tuple(SAVE_FORMATS)
    assert tuple(cli_generate.SCHEDULER_NAMES) == tuple(SCHEDULERS)


def test_help_of_every_command_imports_no_torch():
    code = (
        "import argparse, sys\n"
        "from lorasynth.apps.cli.main import build_parser\n"
        "def walk(p):\n"
        "    p.format_help()\n"
        "    for a in p._actions:\n"
        "        if isinstance(a, argparse._SubParsersAction):\n"
        "            for s in a.choices.values(): walk(s)\n"
        "walk(build_parser())\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'PIL', 'lightning', 'diffusers'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout.strip() == "[]"


def test_file_commands_import_neither_lightning_nor_diffusers(tmp_path):
    """inspect, convert, blend and embed (dlib), run in one fresh process."""
    from PIL import Image
    from skimage import data

    from helpers import ATTN, sd15_lora

    sd15_lora([f"{ATTN}.attn1.to_q"], rank=2).save(tmp_path / "a.safetensors")
    Image.fromarray(data.astronaut()).save(tmp_path / "me.jpg")
    a, b, c = (str(tmp_path / f"{n}.safetensors") for n in "abc")
    code = (
        "import sys\n"
        "from lorasynth.apps.cli.main import main\n"
        f"runs = [['inspect', {a!r}], ['convert', {a!r}, {b!r}, '--to', 'diffusers'],\n"
        f"        ['blend', {a!r} + '=0.5', {b!r} + '=0.5', '-o', {c!r}], ['embed', {str(tmp_path / 'me.jpg')!r}]]\n"
        "assert [main(r) for r in runs] == [0, 0, 0, 0]\n"
        "print('@@', sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'diffusers', 'transformers', 'peft'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "@@ []"


def test_train_latent_help_names_both_kinds_and_the_default():
    leaves = dict(_leaves(build_parser()))
    text = " ".join(leaves[("train", "latent")].format_help().split())
    assert "--kind {pca,vae}" in text and "(default: pca)" in text and "PCA by default" in text
    kind = next(a for a in leaves[("train", "latent")]._actions if "--kind" in a.option_strings)
    assert kind.default == "pca" and tuple(kind.choices) == ("pca", "vae")
    alias = " ".join(leaves[("train", "vae")].format_help().split())
    assert "Deprecated: use `lorasynth train latent`" in alias and "--kind {pca,vae}" in alias
