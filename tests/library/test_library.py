"""LoRA library: round trips, refusals, duplicates, integrity, concurrency, crash safety, imports, search.

LoRAs here are small (two SD1.5 attention modules, rank 2) so the multi-process tests stay fast.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lorasynth.apps.cli.main import main as cli_main
from lorasynth.errors import LayoutError, LibraryError
from lorasynth.formats import load_lora, save_lora
from lorasynth.core.layout import Layout
from lorasynth.library import Library, import_folder
from lorasynth.core.lora import LoRA, LoRAModule

ROOT = Path(__file__).resolve().parents[2]
ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
NAMES = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_v"]
SHAPES = {NAMES[0]: (320, 320), NAMES[1]: (320, 768)}

# Builds the same small LoRAs in helper subprocesses (kept in sync with small_lora below).
SUBPROCESS_PRELUDE = f"""
import sys, torch
from lorasynth.core.lora import LoRA, LoRAModule
SHAPES = {SHAPES!r}
def small_lora(seed):
    g = torch.Generator().manual_seed(seed)
    return LoRA({{n: LoRAModule(torch.randn(2, s[1], generator=g), torch.randn(s[0], 2, generator=g), 4.0)
                 for n, s in SHAPES.items()}})
"""


def small_lora(seed: int, alpha: float = 4.0) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    return LoRA({n: LoRAModule(torch.randn(2, s[1], generator=g), torch.randn(s[0], 2, generator=g), alpha)
                 for n, s in SHAPES.items()})


def deltas_equal(a: LoRA, b: LoRA, tol: float = 1e-6) -> bool:
    return set(a.modules) == set(b.modules) and all(
        (a.modules[n].delta() - b.modules[n].delta()).abs().max().item() <= tol for n in a.modules)


@pytest.fixture
def layout() -> Layout:
    return Layout.from_lora(small_lora(0))


@pytest.fixture
def lib(tmp_path, layout):
    with Library.create(tmp_path / "lib", "sd15-test", layout, embedder="dlib") as library:
        yield library


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --------------------------------------------------------------------------- basics


def test_add_get_list_show_remove_export(lib, tmp_path):
    emb = np.random.default_rng(0).normal(size=128)
    r1 = lib.add(small_lora(1), "alice", "file-a", {"age": 30}, {"dlib": emb})
    r2 = lib.add(small_lora(2), "bob")
    assert (r1.duplicate, r2.duplicate) == (False, False) and r1.id != r2.id
    entry, lora = lib.get("alice")
    assert entry.id == r1.id and entry.attributes == {"age": 30} and entry.rank == 2 and entry.alpha == 4.0
    assert deltas_equal(lora, small_lora(1), 0.0)
    assert lib.get(r2.id)[0].name == "bob" and lib.get(str(r2.id))[0].name == "bob"
    assert [e.name for e in lib.list()] == ["alice", "bob"]
    shown = lib.show("alice")
    assert shown["embeddings"]["dlib"]["dim"] == 128 and Path(shown["blob_path"]).is_file()
    np.testing.assert_allclose(lib.entry_embeddings(r1.id)["dlib"], unit(emb), atol=1e-6)
    for fmt in ("kohya", "diffusers"):
        out = lib.export("alice", tmp_path / f"alice_{fmt}.safetensors", fmt)
        back = load_lora(out)
        assert back.metadata["lorasynth.source_format"] == fmt and deltas_equal(back, small_lora(1))
    blob = lib.blob_path(entry.blob)
    assert lib.remove("alice").id == r1.id
    assert not blob.exists() and len(lib) == 1 and lib.embedders() == {}
    with pytest.raises(LibraryError, match="no entry"):
        lib.get("alice")
    reopened = Library.open(lib.root)
    assert reopened.layout == lib.layout and reopened.embedder == "dlib" and len(reopened) == 1
    reopened.close()


def test_layout_mismatch_refused_naming_module(lib):
    missing = LoRA({NAMES[0]: small_lora(1).modules[NAMES[0]]})
    with pytest.raises(LayoutError, match=r"missing.*attn2\.to_v"):
        lib.add(missing, "half")
    wrong_rank = small_lora(1)
    m = wrong_rank.modules[NAMES[1]]
    wrong_rank.modules[NAMES[1]] = LoRAModule(torch.zeros(3, 768), torch.zeros(320, 3), 3.0)
    with pytest.raises(LayoutError, match=r"attn2\.to_v.*\(3, 768\)"):
        lib.add(wrong_rank, "rank3")
    assert len(lib) == 0 and m is not None


def test_nan_and_bad_embedding_refused(lib):
    bad = small_lora(1)
    bad.modules[NAMES[0]].up[0, 0] = float("nan")
    with pytest.raises(LibraryError, match="non-finite"):
        lib.add(bad, "nan")
    with pytest.raises(LibraryError, match="all zeros"):
        lib.add(small_lora(2), "zero-emb", embeddings={"dlib": np.zeros(128)})
    lib.add(small_lora(3), "ok", embeddings={"dlib": np.ones(128)})
    with pytest.raises(LibraryError, match="128"):
        lib.add(small_lora(4), "wrong-dim", embeddings={"dlib": np.ones(64)})
    assert [e.name for e in lib.list()] == ["ok"]


def test_duplicates_detected_by_content(lib):
    first = lib.add(small_lora(1), "one")
    again = lib.add(small_lora(1), "one-again", attributes={"x": 1})
    assert again.duplicate and again.id == first.id and again.name == "one"
    with pytest.raises(LibraryError, match="already used"):
        lib.add(small_lora(2), "one")
    assert len(lib) == 1
    results = lib.add_many([])
    assert results == []


def test_verify_detects_corrupt_and_missing_blobs(lib):
    a = lib.add(small_lora(1), "a")
    b = lib.add(small_lora(2), "b")
    lib.add(small_lora(3), "c")
    assert lib.verify().ok
    path_a = lib.blob_path(lib.resolve(a.id).blob)
    data = bytearray(path_a.read_bytes())
    data[-3] ^= 0xFF
    path_a.write_bytes(bytes(data))
    lib.blob_path(lib.resolve(b.id).blob).unlink()
    orphan = lib.root / "blobs" / "ab" / ("ab" + "0" * 62 + ".safetensors")
    orphan.parent.mkdir()
    orphan.write_bytes(b"x")
    report = lib.verify()
    assert not report.ok
    assert [c[1] for c in report.corrupt] == ["a"] and [m[1] for m in report.missing] == ["b"]
    assert report.orphans == [str(orphan)]
    with pytest.raises(LibraryError, match="corrupt"):
        lib.get("a")
    with pytest.raises(LibraryError, match="missing"):
        lib.get("b")
    assert lib.clean() == (1, 0) and not orphan.exists()


# --------------------------------------------------------------------------- processes


ADDER = SUBPROCESS_PRELUDE + """
from lorasynth.library import Library
lib = Library.open(sys.argv[1])
base = int(sys.argv[2])
for i in range(50):
    r = lib.add(small_lora(base + i), f"p{base}-{i}", source="proc", embeddings={"dlib": torch.randn(128).numpy()})
    assert not r.duplicate
print("done", flush=True)
"""


def test_two_processes_adding_concurrently_lose_nothing(lib):
    procs = [subprocess.Popen([sys.executable, "-c", ADDER, str(lib.root), str(base)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for base in (1000, 2000)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert len(lib) == 100
    names = {e.name for e in lib.list()}
    assert names == {f"p{b}-{i}" for b in (1000, 2000) for i in range(50)}
    assert lib.embeddings("dlib")[1].shape == (100, 128)
    report = lib.verify()
    assert report.ok and not report.orphans and not report.temp_files


def write_plain_kohya(lora: LoRA, path: Path) -> None:
    """A kohya file without name-dependent metadata: every file gets the same header length.

    (save_lora's ``ss_output_name`` makes the header length depend on the file name, and a
    header of 0x280/0x380/0x480/0x580 bytes trips the pickle guard of read_safetensors.)
    """
    from lorasynth.library import blob_bytes

    path.write_bytes(blob_bytes(lora))


def _count(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_killed_import_leaves_a_valid_library(lib, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    n = 300
    for i in range(n):  # plain kohya files with a constant header (see write_plain_kohya)
        write_plain_kohya(small_lora(5000 + i), folder / f"l{i:03d}.safetensors")
    assert deltas_equal(load_lora(folder / "l007.safetensors"), small_lora(5007))
    proc = subprocess.Popen([sys.executable, "-m", "lorasynth.apps.cli.main", "library", "import", str(lib.root), str(folder)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = lib.root / "library.sqlite"
    deadline = time.time() + 120
    while _count(db) < 15 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with Library.open(lib.root) as after:
        done = len(after)
        assert 15 <= done < n, "import was not interrupted part-way"
        report = after.verify()
        assert report.ok, report.lines()
        r = after.add(small_lora(99), "after-crash")
        assert not r.duplicate and len(after) == done + 1
        # the import can simply be run again: finished files come back as duplicates
        rerun = import_folder(after, folder, progress=False)
        assert len(rerun.added) == n - done and len(rerun.duplicates) == done and rerun.ok
        assert after.verify().ok and len(after) == n + 1


# --------------------------------------------------------------------------- folder import


@pytest.fixture(scope="module")
def astronaut_jpgs(tmp_path_factory):
    from PIL import Image
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    img = data.astronaut()
    Image.fromarray(img).save(d / "astro.jpg", quality=95)
    Image.fromarray(np.ascontiguousarray(img[:, ::-1])).save(d / "astro_flip.jpg", quality=95)
    return d / "astro.jpg", d / "astro_flip.jpg"


def test_folder_import_with_every_sidecar_kind(lib, tmp_path, astronaut_jpgs):
    import shutil

    from lorasynth.faces import get_embedder

    jpg, flip = astronaut_jpgs
    src = tmp_path / "src"
    src.mkdir()
    save_lora(small_lora(1), src / "a.safetensors", "kohya")
    np.save(src / "a.npy", np.arange(1, 129, dtype=np.float32))
    save_lora(small_lora(2), src / "b.safetensors", "diffusers")
    shutil.copy(jpg, src / "b.jpg")
    (src / "b.json").write_text(json.dumps({"hair": "brown", "glasses": False}))
    save_lora(small_lora(3), src / "c.safetensors")
    (src / "c").mkdir()
    shutil.copy(jpg, src / "c" / "1.jpg")
    shutil.copy(flip, src / "c" / "2.jpg")
    save_lora(small_lora(4), src / "d.safetensors")
    (src / "d.json").write_text("[1, 2]")  # not an object
    (src / "e.safetensors").write_bytes(b"garbage that is not a safetensors file")
    save_lora(LoRA({NAMES[0]: small_lora(5).modules[NAMES[0]]}), src / "f.safetensors")  # wrong layout
    save_lora(small_lora(1), src / "g.safetensors")  # same weights as a
    np.save(src / "h.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)  # pickled sidecar
    save_lora(small_lora(8), src / "h.safetensors")
    (src / "p").mkdir()  # a peft adapter folder (alpha from adapter_config.json) with a photo inside
    peft = small_lora(9)
    from lorasynth.core.safe_io import write_safetensors

    write_safetensors({f"base_model.model.{n[len('unet.'):]}.lora_{ab}.weight": t
                       for n, m in peft.modules.items() for ab, t in (("A", m.down), ("B", m.up))},
                      src / "p" / "adapter_model.safetensors")
    (src / "p" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    shutil.copy(flip, src / "p" / "face.jpg")

    report = import_folder(lib, src, progress=False)
    assert [r.name for r in report.added] == ["a", "b", "c", "p"]
    assert [s for s, _ in report.duplicates] == [str(src / "g.safetensors")]
    errors = dict(report.errors)
    assert set(errors) == {str(src / f"{x}.safetensors") for x in "defh"}
    assert "JSON object" in errors[str(src / "d.safetensors")]
    assert "not a safetensors" in errors[str(src / "e.safetensors")]
    assert "attn2.to_v" in errors[str(src / "f.safetensors")]
    assert "npy" in errors[str(src / "h.safetensors")]

    embs = {e.name: lib.entry_embeddings(e.id)["dlib"] for e in lib.list()}
    np.testing.assert_allclose(embs["a"], unit(np.arange(1, 129)), atol=1e-6)
    dlib = get_embedder("dlib")
    e1, e2 = dlib.embed(str(jpg)).embedding, dlib.embed(str(flip)).embedding
    np.testing.assert_allclose(embs["b"], e1, atol=1e-5)
    np.testing.assert_allclose(embs["c"], unit(e1 + e2), atol=1e-5)
    np.testing.assert_allclose(embs["p"], e2, atol=1e-5)
    assert deltas_equal(lib.get("p")[1], peft)
    assert lib.get("b")[0].attributes == {"hair": "brown", "glasses": False}
    assert deltas_equal(lib.get("b")[1], small_lora(2))
    assert lib.verify().ok


# --------------------------------------------------------------------------- search


def test_nearest_matches_brute_force_and_tracks_changes(lib):
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(40, 128)).astype(np.float32)
    ids = [lib.add(small_lora(100 + i), f"e{i}", embeddings={"dlib": vecs[i]}).id for i in range(40)]
    q = vecs[7] + 0.05 * rng.normal(size=128)
    hits = lib.nearest(q, "dlib", k=5)
    normed = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    brute = np.argsort(-(normed @ unit(q)))[:5]
    assert [h.id for h in hits] == [ids[i] for i in brute] and hits[0].name == "e7"
    assert hits[0].score == pytest.approx(float(normed[7] @ unit(q)), abs=1e-5)
    got_ids, mat = lib.embeddings("dlib")
    assert list(got_ids) == ids and mat.shape == (40, 128)
    # cache invalidation: a new entry, a changed embedding and a removal are all seen
    new = lib.add(small_lora(500), "new", embeddings={"dlib": q})
    assert lib.nearest(q, "dlib", 1)[0].id == new.id
    lib.set_embedding("e3", "dlib", -q)
    assert lib.nearest(-q, "dlib", 1)[0].name == "e3"
    lib.remove("new")
    assert lib.nearest(q, "dlib", 1)[0].name == "e7"
    assert len(lib.nearest(q, "dlib", 100)) == 40
    with pytest.raises(LibraryError, match="dims"):
        lib.nearest(np.ones(64), "dlib")


def test_nearest_sees_other_process_changes(lib):
    lib.add(small_lora(1), "x", embeddings={"dlib": np.ones(128)})
    assert len(lib.embeddings("dlib")[0]) == 1
    with Library.open(lib.root) as other:
        other.add(small_lora(2), "y", embeddings={"dlib": -np.ones(128)})
    assert lib.nearest(-np.ones(128), "dlib", 1)[0].name == "y"


# --------------------------------------------------------------------------- CLI


def test_cli_library_commands(tmp_path, capsys):
    ref = tmp_path / "ref.safetensors"
    save_lora(small_lora(1), ref)
    d = str(tmp_path / "clilib")
    assert cli_main(["library", "init", d, "--base", "sd15", "--layout", str(ref), "--embedder", "dlib"]) == 0
    np.save(tmp_path / "e.npy", np.ones(128, np.float32))
    assert cli_main(["library", "add", d, str(ref), "--name", "ref", "--embedding", str(tmp_path / "e.npy"),
                     "--attr", "age=31", "--attr", "style=photo"]) == 0
    assert cli_main(["library", "add", d, str(ref), "--name", "again"]) == 0
    assert "already in the library" in capsys.readouterr().out
    assert cli_main(["library", "list", d, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["name"] == "ref" and listed[0]["attributes"] == {"age": 31, "style": "photo"}
    assert listed[0]["embeddings"] == ["dlib"]
    assert cli_main(["library", "show", d, "ref"]) == 0
    assert json.loads(capsys.readouterr().out)["embeddings"]["dlib"]["dim"] == 128
    out = tmp_path / "out.safetensors"
    assert cli_main(["library", "export", d, "1", str(out), "--to", "diffusers"]) == 0
    assert deltas_equal(load_lora(out), small_lora(1))
    assert cli_main(["library", "verify", d]) == 0
    with Library.open(d) as lib:
        path = lib.blob_path(lib.resolve(1).blob)
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    assert cli_main(["library", "verify", d]) == 1
    assert "corrupt" in capsys.readouterr().out
    assert cli_main(["library", "remove", d, "ref"]) == 0
    assert cli_main(["library", "verify", d]) == 0
    assert cli_main(["library", "show", d, "nope"]) == 2
    assert cli_main(["library", "init", d, "--base", "x"]) == 2  # already a library
    assert cli_main(["library", "add", d, str(tmp_path / "e.npy")]) == 2  # refuses non-safetensors


def test_cli_group_accepts_extra_subcommands():
    import argparse

    from lorasynth.apps.cli import library as cli_library

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    extra = cli_library.library_subparsers(sub).add_parser("train")  # another module, registered first
    extra.set_defaults(func=lambda a: 0)
    cli_library.register(sub)
    args = parser.parse_args(["library", "train"])
    assert args.func(args) == 0
    assert parser.parse_args(["library", "list", "x"]).func is cli_library.cmd_list


def test_cli_embed(tmp_path, astronaut_jpgs, capsys):
    jpg, _ = astronaut_jpgs
    out = tmp_path / "emb.npy"
    assert cli_main(["embed", str(jpg), "--json", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_faces"] >= 1 and info["index"] == 0 and info["dim"] == 128
    assert len(info["faces"]) == info["n_faces"]
    np.testing.assert_allclose(np.load(out), np.array(info["embedding"], np.float32), atol=1e-6)
    assert cli_main(["embed", str(jpg)]) == 0
    assert "found, used the largest (index 0)" in capsys.readouterr().out
    assert cli_main(["embed", str(jpg), "--face-index", "9"]) == 2
    assert "out of range" in capsys.readouterr().err


# --------------------------------------------------------------------------- pack


def test_canonical_vectors_match_layout_flatten(layout):
    from lorasynth.library.packing import canonical_vectors

    loras = [small_lora(i, alpha=float(i + 1)) for i in range(5)]
    loras[1].modules[NAMES[0]].down.zero_()  # a zero module (rank-deficient)
    loras[2] = loras[2].to(torch.float16)
    ref = torch.stack([layout.flatten(l, canonical=True) for l in loras])
    assert torch.equal(canonical_vectors(loras, layout), ref)
    w2w = Layout.w2w()
    rows = [w2w.unflatten(torch.randn(w2w.size, generator=torch.Generator().manual_seed(i)) * 0.01, alpha=27.0)
            for i in range(3)]
    assert torch.equal(canonical_vectors(rows, w2w), torch.stack([w2w.flatten(r, canonical=True) for r in rows]))


def test_pack_library(lib, tmp_path, layout):
    from lorasynth.library import pack_library
    from lorasynth.library.pack import open_pack

    rng = np.random.default_rng(0)
    embs = {}
    for i in range(7):
        e = rng.normal(size=128) if i != 3 else None  # entry 4 has no embedding
        r = lib.add(small_lora(i), f"n{i}", embeddings={"dlib": e} if e is not None else {})
        if e is not None:
            embs[r.id] = unit(e)
    result = pack_library(lib, tmp_path / "pack", progress=False, batch_size=4)
    assert result.entries == 6 and result.skipped_without_embedding == [4] and result.embed_dim == 128
    pack = open_pack(tmp_path / "pack")
    assert pack.n == 6 and pack.embedder == "dlib" and pack.layout == layout
    ids = [int(i) for i in pack.ids]
    assert ids == sorted(embs)
    rows = pack.read_rows(np.arange(6))
    for j, entry_id in enumerate(ids):
        expected = layout.flatten(lib.get(entry_id)[1], canonical=True).numpy()
        np.testing.assert_array_equal(rows[j], expected)
        np.testing.assert_allclose(pack.read_embeddings([j])[0], embs[entry_id], atol=1e-6)
    # without embeddings: every entry
    flat = pack_library(lib, tmp_path / "pack0", embedder="", progress=False)
    assert flat.entries == 7 and flat.embed_dim == 0 and open_pack(tmp_path / "pack0").embed_dim == 0
    with pytest.raises(LibraryError, match="arcface"):
        pack_library(lib, tmp_path / "pack1", embedder="arcface", progress=False)
    assert cli_main(["library", "pack", str(lib.root), str(tmp_path / "pack2")]) == 0
    assert open_pack(tmp_path / "pack2").n == 6
