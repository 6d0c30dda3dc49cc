#!/usr/bin/env python
"""Do the quality guards bite? Break the code on purpose, in a temporary copy, and run the tests.

Each mutation edits one file of a copy of the repository (the working tree is never touched),
runs the quality tests that should catch it, and records whether they failed (caught) or passed
(missed). Prints JSON: one entry per mutation with ``caught``, the tests run and the failing
test names.

    python scripts/mutation_check.py                  # every mutation (about 5 min each on 2 cores)
    python scripts/mutation_check.py --only temperature_ignored,gamma_grid_one_value
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUALITY = "tests/synthesis/test_quality.py"

#: name -> (file, old text, new text, tests to run, what it breaks)
MUTATIONS: dict[str, tuple[str, str, str, str, str]] = {
    "temperature_ignored": (
        "lorasynth/models/hypernet/model.py", "return self.from_x0(x * self.spread_scale, mean_cond).float()",
        "return self.from_x0(x, mean_cond).float()", QUALITY, "sample() ignores the temperature"),
    "gamma_grid_one_value": (
        "lorasynth/models/hypernet/regression.py", "GAMMA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)",
        "GAMMA_GRID = (8.0,)", QUALITY, "the kernel-width grid reduced to one value"),
    "validation_person_in_test": (
        "lorasynth/synthesis/evaluation.py", 'raise LeakError("held-out persons are also validation persons")',
        "pass", QUALITY, "a validation person in the test split goes unnoticed"),
    "leak_beyond_landmarks": (
        "lorasynth/synthesis/evaluation.py", '("residual covariance", hyper.cov_cond)',
        '("residual covariance", hyper.cov_cond[:0])', QUALITY,
        "a one-person leak into the hypernetwork with more rows than landmarks"),
    "leak_neighbour_mean_rows_ignored": (
        "lorasynth/synthesis/evaluation.py", '(("neighbour mean", hyper.nb_cond)', '(("neighbour mean", hyper.nb_cond[:0])',
        QUALITY, "the leak check ignores the neighbour mean's stored conditions"),
    "average_without_second_order_term": (
        "lorasynth/models/hypernet/model.py",
        "pts = torch.cat([mean[:, None] + root.transpose(1, 2), mean[:, None] - root.transpose(1, 2)], dim=1)",
        "pts = torch.cat([mean[:, None] + 0 * root.transpose(1, 2), mean[:, None] - 0 * root.transpose(1, 2)], dim=1)",
        QUALITY, "the average loses the covariance term (the ΔW of the mean latent)"),
    "worse_mean_ridge": (
        "lorasynth/models/hypernet/regression.py", "RIDGE_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)",
        "RIDGE_GRID = (1.0,)", QUALITY, "a worse conditional mean (one over-strong ridge)"),
    "temperature_clamped_at_grid": (
        "lorasynth/training/hypernet.py", "TEMPERATURE_RANGE = (0.05, 3.0)", "TEMPERATURE_RANGE = (1.5, 3.0)", QUALITY,
        "the temperature clamped at a grid edge"),
    "default_strategy_ignores_baselines": (
        "lorasynth/training/strategy_choice.py", '    if not notes:\n        return "diffusion", notes',
        '    if True:\n        return "diffusion", []', "tests/synthesis/test_synthesis.py",
        "the default strategy stays one sample even below nearest"),
    "evaluation_ignores_the_model_blend": (
        "lorasynth/synthesis/synthesizer.py", 'k = s.k if s.k is not None else blend.get("k", BLEND_K)',
        "k = s.k if s.k is not None else BLEND_K", "tests/synthesis/test_synthesis.py",
        "the CLI/API blend ignores the k chosen on validation"),
}


def run(name: str, keep: bool) -> dict:
    path, old, new, tests, what = MUTATIONS[name]
    tmp = Path(tempfile.mkdtemp(prefix=f"mutation_{name}_"))
    try:
        dst = tmp / "repo"
        shutil.copytree(ROOT, dst, symlinks=True, ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "node_modules", "build", "dist"))
        target = dst / path
        text = target.read_text()
        if text.count(old) != 1:
            return {"mutation": name, "what": what, "caught": None, "error": f"{path}: the text to mutate is not there once"}
        target.write_text(text.replace(old, new))
        t0 = time.perf_counter()
        proc = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "pytest", "-p", "no:cacheprovider", "-n", "0",
                               "-q", "-x", tests], cwd=dst, capture_output=True, text=True,
                              env={"PYTHONPATH": str(dst), "PATH": "/usr/bin:/bin", "HOME": str(tmp)})
        failed = sorted(set(re.findall(r"FAILED (\S+)", proc.stdout)))
        return {"mutation": name, "what": what, "file": path, "tests": tests, "caught": proc.returncode != 0,
                "failed": failed, "seconds": round(time.perf_counter() - t0, 1),
                "tail": proc.stdout.strip().splitlines()[-1:] if proc.stdout else []}
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated mutation names (default: all): " + ", ".join(MUTATIONS))
    ap.add_argument("--keep", action="store_true", help="keep the mutated copies")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(MUTATIONS)
    unknown = [n for n in names if n not in MUTATIONS]
    if unknown:
        sys.exit(f"unknown mutations {unknown}; choose from {list(MUTATIONS)}")
    results = []
    for name in names:
        results.append(run(name, args.keep))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"mutations": results, "all_caught": all(r["caught"] for r in results)}, indent=2))


if __name__ == "__main__":
    main()
