#!/usr/bin/env python
"""Cold start: wall time of fresh processes, side by side with a bare ``import torch``; prints JSON.

Commands, each run as a new process, interleaved round by round (within each environment) so
that load on the machine hits all of them alike:

* ``torch``       ``python -c "import torch"`` (the reference: no tool on torch starts faster)
* ``help``        ``lorasynth --help``
* ``synthesize``  ``lorasynth synthesize --face astronaut.jpg --model M -o out.safetensors``
                  (photo -> LoRA file with the dlib embedder; M: the w2w layout with a 512-d
                  latent, untrained default-config VAE and hypernetwork, as in bench_synthesize.py)

in two environments: Python may write bytecode caches (``PYTHONDONTWRITEBYTECODE`` unset), and
``PYTHONDONTWRITEBYTECODE=1`` (many Docker images set it; Python then relies on the caches the
install wrote). Reported: median seconds, ratio to the torch import (goals: synthesize <= 1.3x,
help <= 0.3x), whether Lightning / diffusers were imported, and how many imported modules had
no bytecode cache on disk.

    python scripts/bench_cold.py               # 7 rounds
    python scripts/bench_cold.py --repeats 3 --model MODEL_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

GOALS = {"synthesize": 1.3, "help": 0.3}
HEAVY = ("lightning", "diffusers", "transformers", "peft")

# modules imported by the command, and how many of their sources have no bytecode cache file
_COUNT = r"""
import importlib.util, os, sys
try:
    from lorasynth.apps.cli.main import main
    main(sys.argv[1:])
except SystemExit:
    pass
missing = total = 0
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if f and f.endswith(".py"):
        total += 1
        missing += not os.path.exists(importlib.util.cache_from_source(f))
heavy = sorted({n.split(".")[0] for n in sys.modules} & set(%r))
print("@@", total, missing, ",".join(heavy))
""" % (HEAVY,)


def lorasynth_cmd() -> list[str]:
    script = Path(sys.executable).with_name("lorasynth")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lorasynth.apps.cli.main"]


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return dt


def imports_of(args: list[str], env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", _COUNT, *args], env=env, capture_output=True, text=True)
    line = next((l for l in r.stdout.splitlines() if l.startswith("@@")), None)
    if line is None:
        return {"error": r.stderr[-500:]}
    _, total, missing, heavy = (line.split(" ") + [""])[:4]
    return {"modules": int(total), "without_bytecode": int(missing), "heavy": [h for h in heavy.split(",") if h]}


def prepare(tmp: Path, model: str | None) -> tuple[str, Path]:
    from PIL import Image
    from skimage import data

    photo = tmp / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(photo)
    if model:
        return model, photo
    from bench_synthesize import make_model, write_pack

    write_pack(tmp / "pack", 64)
    make_model(tmp / "pack", tmp / "model")
    return str(tmp / "model"), photo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="rounds (each runs every command once per environment)")
    ap.add_argument("--model", default=None, help="model folder (default: a w2w-layout model built in a temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("LORASYNTH_BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        model, photo = prepare(tmp, args.model)
        ls = lorasynth_cmd()
        commands = {
            "torch": [sys.executable, "-c", "import torch"],
            "help": ls + ["--help"],
            "synthesize": ls + ["synthesize", "--face", str(photo), "--model", model, "-o", str(tmp / "out.safetensors")],
        }
        base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        base["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        envs = {"bytecode_cached": base, "PYTHONDONTWRITEBYTECODE=1": {**base, "PYTHONDONTWRITEBYTECODE": "1"}}
        imports = {name: imports_of(cmd[len(ls):], envs["PYTHONDONTWRITEBYTECODE=1"])
                   for name, cmd in commands.items() if name != "torch"}
        # PYTHONDONTWRITEBYTECODE=1 first: it sees the bytecode exactly as the install left it (the
        # other environment then writes caches for whatever was missing)
        times = {e: {c: [] for c in commands} for e in envs}
        for e in reversed(envs):
            for cmd in commands.values():  # warm the page cache
                run(cmd, envs[e])
            for _ in range(args.repeats):
                for c, cmd in commands.items():
                    times[e][c].append(run(cmd, envs[e]))
    result = {"benchmark": "cold_start", "cpus": os.cpu_count(), "repeats": args.repeats,
              "load_average": os.getloadavg()[0], "imports (PYTHONDONTWRITEBYTECODE=1)": imports, "goals_x_torch": GOALS}
    for e in envs:
        med = {c: statistics.median(v) for c, v in times[e].items()}
        result[e] = {
            "median_s": {c: round(v, 3) for c, v in med.items()},
            "x_torch": {c: round(med[c] / med["torch"], 3) for c in commands if c != "torch"},
            "meets_goals": {c: med[c] / med["torch"] <= g for c, g in GOALS.items()},
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
