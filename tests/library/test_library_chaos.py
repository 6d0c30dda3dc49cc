"""Library chaos: ``kill -9`` of ``library import`` processes at random points, with concurrent importers.

Afterwards the library must verify (no missing or corrupt blob, no row without its blob),
``verify --clean`` must remove every temp file the dead processes left, a re-run must finish
the import, and every entry must hold exactly the tensors of its source file.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lorasynth.formats import load_lora, save_lora
from lorasynth.core.layout import Layout
from lorasynth.library import Library
from lorasynth.library.importers import import_folder
from lorasynth.core.lora import LoRA, LoRAModule

ROUNDS = 3  # each round: two concurrent importers of a fresh folder, both killed part-way
PER_ROUND = 40
N_FILES = ROUNDS * PER_ROUND


def _source_folder(folder: Path) -> Layout:
    g = torch.Generator().manual_seed(0)
    layout = None
    for i in range(N_FILES):
        (folder / f"r{i // PER_ROUND}").mkdir(parents=True, exist_ok=True)
        lora = LoRA({
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
                LoRAModule(torch.randn(1, 320, generator=g), torch.randn(320, 1, generator=g), 1.0),
        })
        save_lora(lora, folder / f"r{i // PER_ROUND}" / f"id{i:03d}.safetensors")
        layout = layout or Layout.from_lora(lora)
    return layout


def _writes(lib: Path) -> int:
    """Files under blobs/ (staged temp files and blobs): grows as soon as an importer writes."""
    return sum(len(files) for _, _, files in os.walk(lib / "blobs"))


def _importer(lib: Path, src: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, "-m", "lorasynth.apps.cli.main", "library", "import", str(lib), str(src)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def test_kill9_and_concurrent_imports_leave_a_consistent_library(tmp_path):
    src, root = tmp_path / "src", tmp_path / "lib"
    layout = _source_folder(src)
    Library.create(root, "sd15", layout, embedder=None).close()
    rng = random.Random(1)
    kills = 0
    for r in range(ROUNDS):
        procs = [_importer(root, src / f"r{r}") for _ in range(2)]
        # kill on progress, not on time: once the importers have written k more blob files (staged
        # temp files count), plus a few ms so some kills land mid-blob or mid-transaction
        target, give_up = _writes(root) + rng.randint(2, PER_ROUND // 2), time.monotonic() + 120
        while _writes(root) < target and time.monotonic() < give_up and all(p.poll() is None for p in procs):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))
        alive = [p.poll() is None for p in procs]
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert all(alive), f"round {r}: an importer ended before the kill (alive: {alive}, written: {_writes(root)})"
        kills += len(procs)
    assert kills == 2 * ROUNDS  # every importer really died mid-way (the counts are printed with -s)

    with Library.open(root) as lib:
        report = lib.verify()
        assert report.ok, report.lines()
        lib.clean()
        after = lib.verify()
        assert after.ok and after.temp_files == [] and after.orphans == [], after.lines()
        partial = len(lib)  # what the killed importers committed
        for r in range(ROUNDS):  # the re-run finishes the job
            assert import_folder(lib, src / f"r{r}", progress=False).errors == []
        assert len(lib) == N_FILES
        for entry in lib.list():
            stored = lib.get(entry.id)[1]
            source = load_lora(src / f"r{int(entry.name[2:]) // PER_ROUND}" / f"{entry.name}.safetensors")
            for name, m in source.modules.items():
                s = stored.modules[name]
                assert torch.equal(s.down, m.down) and torch.equal(s.up, m.up) and s.alpha == m.alpha, entry.name
    print(f"kills survived: {kills}; entries committed by killed importers: {partial}/{N_FILES}; "
          f"temp files and orphans they left: {len(report.temp_files)}, {len(report.orphans)}")
