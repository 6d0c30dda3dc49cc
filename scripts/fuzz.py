"""Long fuzz runs: ``python scripts/fuzz.py --cases N [--seed S] [--no-fixed] [--quick]``.

Runs the fixed hostile cases of issue 10 and N random mutations (tests/fuzz/hostile.py) through
every reading command in-process, and prints JSON: cases tried, commands run, failures (and the
failure lines with --verbose, or the first 20). Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=500, help="random cases (besides the fixed ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fixed", action="store_true", help="skip the fixed cases of issue 10")
    ap.add_argument("--quick", action="store_true", help="fewer commands per case")
    ap.add_argument("--verbose", action="store_true", help="print every failure line")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from hostile import run_cases

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorasynth-fuzz-") as tmp:
        result = run_cases(Path(tmp), args.cases, args.seed, fixed=not args.no_fixed, quick=args.quick)
    lines = result.pop("failure_lines")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["failure_lines"] = lines if args.verbose else lines[:20]
    print(json.dumps(result, indent=2))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
