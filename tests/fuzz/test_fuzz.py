"""Fast subset of the hostile-input fuzzing (the long runs: ``scripts/fuzz.py --cases N``).

Every fixed case of issue 10 and a few dozen random mutations go through the reading commands
in-process; any exception other than SystemExit, an exit-2 error that is not one line, an
output written by a failed command, or a touched victim file is a failure.
"""

from __future__ import annotations

import os

import pytest

from hostile import Case, Harness, fixed_cases, random_cases


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("fuzz"), quick=True)
    h.run("setup", ["library", "add", str(h.lib), str(h.good), "--name", "seed-entry", "--embedding", str(h.good_npy)],
          expect=(0,))
    assert not h.failures, [f.line() for f in h.failures]
    return h


FIXED = fixed_cases()


@pytest.mark.parametrize("case", FIXED, ids=[c.name for c in FIXED])
def test_fixed_hostile_case(harness, case: Case):
    before = len(harness.failures)
    harness.case(case)
    assert [f.line() for f in harness.failures[before:]] == []


def test_random_mutations(harness):
    before = len(harness.failures)
    n = 0
    for case in random_cases(int(os.environ.get("LORASYNTH_FUZZ_CASES", "25")), seed=1):
        harness.case(case)
        n += 1
    assert n > 0 and [f.line() for f in harness.failures[before:]] == []


def test_the_harness_catches_broken_promises(harness, monkeypatch):
    """A crash, a two-line error, and a failed command that changed its output are all reported."""
    import sys

    import lorasynth.apps.cli.main as cli

    out = harness.root / "selfcheck.safetensors"
    out.write_bytes(b"old")

    def crash(argv):
        raise KeyError("a bug")

    def clobber(argv):
        out.write_bytes(b"half-written")
        print("lorasynth: error: one\nsecond line", file=sys.stderr)
        return 2

    before = len(harness.failures)
    monkeypatch.setattr(cli, "main", crash)
    harness.run("selfcheck", ["inspect", "x"])
    monkeypatch.setattr(cli, "main", clobber)
    harness.run("selfcheck", ["convert", "x", str(out)], outputs=(out,))
    found = [f.why for f in harness.failures[before:]]
    del harness.failures[before:]
    assert any("KeyError" in w for w in found)
    assert any("one error line" in w for w in found)
    assert any("changed" in w for w in found)
