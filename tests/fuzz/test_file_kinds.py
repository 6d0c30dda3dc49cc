"""File kinds for every path a command reads (issue 20 #6): FIFO, device link, folder, link loop,
dangling link, unreadable file.

Each case puts one hostile kind where a command expects a regular file and runs the command
in-process through the fuzz harness (``hostile.Harness``: no traceback, exit 2 with exactly one
error line or a reported failure, no output written, the victim file untouched), in a thread
with a time limit: a command that blocks on a FIFO or reads ``/dev/zero`` without bound fails
the test instead of hanging the suite. Model-folder files (``synthesize``, ``export-model``)
are covered in ``tests/models/test_model_files.py``.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import make_kind, within
from hostile import Harness, peft_bytes

KINDS = ["fifo", "dev-zero", "folder", "loop", "dangling", "unreadable"]
LIMIT_S = 60


@contextlib.contextmanager
def denied(path: Path):
    """Opening ``path`` fails with EACCES (``os.open`` and ``open``), as for another user's 0600 file."""
    real_os_open, real_open = os.open, builtins.open
    target = os.path.abspath(path)

    def check(p):
        if isinstance(p, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(p)) == target:
            raise PermissionError(13, "Permission denied", os.fsdecode(p))

    def os_open(p, *a, **k):
        check(p)
        return real_os_open(p, *a, **k)

    def open_(p, *a, **k):
        check(p)
        return real_open(p, *a, **k)

    os.open, builtins.open = os_open, open_
    try:
        yield
    finally:
        os.open, builtins.open = real_os_open, real_open


def run_limited(h: Harness, case: str, argv: list, expect=(1, 2), outputs=(), unreadable: Path | None = None):
    """``h.run`` in a thread; a command still running after LIMIT_S seconds is a hang."""
    def work():
        with denied(unreadable) if unreadable is not None else contextlib.nullcontext():
            return h.run(case, [str(a) for a in argv], expect=expect, outputs=tuple(outputs))

    return within(LIMIT_S, work, f"{case}: lorasynth {' '.join(map(str, argv))} hangs")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("kinds"), quick=True)
    h.run("setup", ["library", "add", str(h.lib), str(h.good), "--name", "seed-entry", "--embedding", str(h.good_npy)],
          expect=(0,))
    assert not h.failures, [f.line() for f in h.failures]
    return h


def check(h: Harness, before: int) -> None:
    found = [f.line() for f in h.failures[before:]]
    del h.failures[before:]
    assert found == []


# --------------------------------------------------------------------------- LoRA files and embeddings


@pytest.mark.parametrize("kind", KINDS)
def test_input_file_of_every_kind(harness, tmp_path, kind):
    """Every command that reads a LoRA file, a layout or an embedding named on the command line."""
    h, before = harness, len(harness.failures)
    f = tmp_path / "x.safetensors"
    make_kind(f, kind)
    npy = tmp_path / "e.npy"
    make_kind(npy, kind)
    out = tmp_path / "out" / "y.safetensors"
    un = {"unreadable": f}.get(kind)
    for argv in (["inspect", f], ["inspect", "--json", "--modules", f], ["convert", f, out], ["blend", f"{f}=1", "-o", out],
                 ["blend", f"{h.good}=1", f"{f}=0.5", "-o", out], ["library", "add", h.lib, f, "--name", "k"],
                 ["library", "init", tmp_path / "newlib", "--base", "x", "--layout", f]):
        run_limited(h, f"input-{kind}", argv, expect=(2,), outputs=(out,), unreadable=un)
    for argv in (["library", "add", h.lib, h.good, "--name", "k2", "--embedding", npy],
                 ["synthesize", "--model", tmp_path / "no-model", "--embedding", npy, "-o", out]):
        run_limited(h, f"npy-{kind}", argv, expect=(2,), outputs=(out,), unreadable={"unreadable": npy}.get(kind))
    check(h, before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("role", ["lora", "attributes", "embedding", "adapter-config"])
def test_import_folder_items_of_every_kind(harness, tmp_path, kind, role):
    """``library import`` walks a folder: a hostile item is reported (exit 1) or refused, never followed or hung on."""
    h, before = harness, len(harness.failures)
    folder = tmp_path / "import"
    folder.mkdir()
    shutil.copy(h.good, folder / "good.safetensors")
    if role == "adapter-config":
        adapter = folder / "adapter"
        adapter.mkdir()
        weights, config = peft_bytes()
        (adapter / "adapter_model.safetensors").write_bytes(weights)
        target = adapter / "adapter_config.json"
    else:
        shutil.copy(h.good, folder / "bad.safetensors")
        target = folder / {"lora": "bad.safetensors", "attributes": "bad.json", "embedding": "bad.npy"}[role]
    make_kind(target, kind)
    lib = tmp_path / "lib"
    shutil.copytree(h.lib, lib)
    rc = run_limited(h, f"import-{role}-{kind}", ["library", "import", lib, folder], expect=(0, 1, 2),
                     unreadable=target if kind == "unreadable" else None)
    if role == "adapter-config" and kind in ("fifo", "dev-zero", "folder", "unreadable"):
        assert rc in (1, 2)  # a config that is there but unreadable is an error, not "no config"
    check(h, before)


def test_adapter_config_of_another_kind_is_an_error_not_a_missing_config(harness, tmp_path):
    from lorasynth.errors import FormatError
    from lorasynth.formats import load_lora

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(peft_bytes()[0])
    (adapter / "adapter_config.json").mkdir()
    with pytest.raises(FormatError, match="is a directory"):
        load_lora(adapter / "adapter_model.safetensors")


# --------------------------------------------------------------------------- library blobs and database


def _blob(lib: Path) -> Path:
    with contextlib.closing(sqlite3.connect(lib / "library.sqlite")) as conn:
        digest = conn.execute("SELECT blob FROM entries ORDER BY id LIMIT 1").fetchone()[0]
    return lib / "blobs" / digest[:2] / f"{digest}.safetensors"


@pytest.mark.parametrize("kind", KINDS)
def test_library_blob_of_every_kind(harness, tmp_path, kind):
    """Issue 20 #6: a FIFO blob hung `library export / verify / merge`, a /dev/zero link read without bound."""
    h, before = harness, len(harness.failures)
    lib = tmp_path / "lib"
    shutil.copytree(h.lib, lib)
    blob = _blob(lib)
    make_kind(blob, kind)
    un = blob if kind == "unreadable" else None
    out = tmp_path / "exp.safetensors"
    assert run_limited(h, f"blob-{kind}", ["library", "verify", lib], expect=(1,), unreadable=un) == 1
    run_limited(h, f"blob-{kind}", ["library", "export", lib, "1", out], expect=(2,), outputs=(out,), unreadable=un)
    run_limited(h, f"blob-{kind}", ["library", "show", lib, "1"], expect=(0, 2), unreadable=un)
    run_limited(h, f"blob-{kind}", ["library", "merge", "--create", tmp_path / "merged", lib], expect=(1, 2), unreadable=un)
    run_limited(h, f"blob-{kind}", ["library", "pack", lib, tmp_path / "pack"], expect=(1, 2), unreadable=un)
    assert not (tmp_path / "pack").exists()
    check(h, before)


def test_verify_names_the_kind_of_a_bad_blob(harness, tmp_path):
    from lorasynth.library import Library

    lib = tmp_path / "lib"
    shutil.copytree(harness.lib, lib)
    make_kind(_blob(lib), "fifo")
    with Library.open(lib) as library:
        report = library.verify()
    assert not report.ok and "FIFO" in report.corrupt[0][3]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder", "loop"])
def test_library_database_of_another_kind(harness, tmp_path, kind):
    h, before = harness, len(harness.failures)
    lib = tmp_path / "lib"
    shutil.copytree(h.lib, lib)
    for extra in ("library.sqlite-wal", "library.sqlite-shm"):
        (lib / extra).unlink(missing_ok=True)
    make_kind(lib / "library.sqlite", kind)
    for argv in (["library", "list", lib], ["library", "verify", lib], ["library", "show", lib, "1"]):
        run_limited(h, f"db-{kind}", argv, expect=(2,))
    check(h, before)


# --------------------------------------------------------------------------- packs


@pytest.fixture(scope="module")
def pack_dir(harness):
    out = harness.root / "kinds-pack"
    harness.run("setup", ["library", "pack", str(harness.lib), str(out)], expect=(0,))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["pack.json", "vectors.npy", "embeddings.npy", "stats.safetensors"])
def test_pack_files_of_every_kind(pack_dir, tmp_path, kind, name):
    from lorasynth.errors import LibraryError
    from lorasynth.library.pack import open_pack

    pack = tmp_path / "pack"
    shutil.copytree(pack_dir, pack)
    make_kind(pack / name, kind)
    box = {}

    def work():
        with denied(pack / name) if kind == "unreadable" else contextlib.nullcontext():
            try:
                p = open_pack(pack)
                p.read_rows(list(range(len(p))))
                p.read_embeddings(list(range(len(p))))
            except LibraryError as e:
                box["error"] = str(e)

    within(LIMIT_S, work, f"open_pack hangs on a {kind} {name}")
    assert "\n" not in box.get("error", "") and box.get("error"), f"a {kind} {name} was read as a pack file"


def test_the_harness_notices_a_hang():
    """The time limit itself works: a command that blocks is reported, not waited for."""
    h = Harness.__new__(Harness)
    release = threading.Event()
    h.run = lambda *a, **k: release.wait(5)
    global LIMIT_S
    old, LIMIT_S = LIMIT_S, 0.2
    try:
        with pytest.raises(AssertionError, match="hangs"):
            run_limited(h, "selfcheck", ["inspect", "x"])
    finally:
        LIMIT_S = old
        release.set()


def test_every_kind_is_refused_by_the_one_reader(tmp_path):
    """The reader every command uses: one FormatError line naming the kind, for each kind."""
    from lorasynth.core.safe_io import read_input_bytes
    from lorasynth.errors import FormatError

    words = {"fifo": "FIFO", "dev-zero": "device", "folder": "directory", "loop": "link",
             "dangling": "no such", "unreadable": "permission denied"}
    for kind, word in words.items():
        p = tmp_path / kind
        make_kind(p, kind)
        with denied(p) if kind == "unreadable" else contextlib.nullcontext():
            with pytest.raises(FormatError, match=word) as err:
                read_input_bytes(p, "file")
        assert "\n" not in str(err.value)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "unreadable")
    with pytest.raises(FormatError, match="symbolic link"):
        read_input_bytes(link, "file", follow_links=False)
    assert read_input_bytes(link, "file") == b"secret"
    assert np.frombuffer(read_input_bytes(link, "file", mutable=True), dtype=np.uint8).size == 6
