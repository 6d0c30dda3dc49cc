"""Issue 10 unit checks: strict readers, atomic writes, output-path errors, library hostility, caps."""

from __future__ import annotations

import os
import sqlite3
import stat

import numpy as np
import pytest
import torch

from lorasynth.errors import LibraryError, LorasynthError, OutputError
from lorasynth.formats import load_lora, save_lora
from lorasynth.core import safe_io
from lorasynth.core.layout import Layout
from lorasynth.library import Library

from helpers import sd15_lora

ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
NAMES = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_v"]


def test_permission_error_is_one_line(tmp_path, monkeypatch):
    path = save_lora(sd15_lora(NAMES), tmp_path / "a.safetensors")

    real_open = os.open

    def denied(p, *a, **k):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(LorasynthError, match="permission denied"):
        load_lora(path)


def test_atomic_write_honours_the_umask_and_keeps_an_existing_mode(tmp_path):
    old = os.umask(0o027)
    try:
        p = safe_io.write_bytes(tmp_path / "new.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    p.chmod(0o604)
    safe_io.write_text(p, "y")
    assert stat.S_IMODE(p.stat().st_mode) == 0o604 and p.read_text() == "y"


def test_unwritable_targets_are_one_output_error_and_leave_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "adir").mkdir()
    for target, why in [(blocker / "y.bin", "is a file, not a folder"), (tmp_path / "adir", "existing directory")]:
        with pytest.raises(OutputError, match=why):
            safe_io.write_bytes(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "file"]


def test_read_json_is_strict(tmp_path):
    cases = {"deep.json": b"[" * 10000 + b"]" * 10000, "dup.json": b'{"a": 1, "a": 2}', "latin1.json": b'{"a": "\xff"}',
             "list.json": b"[1]", "bad.json": b"{oops"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LorasynthError) as e:
            safe_io.read_json(tmp_path / name, "config")
        assert "\n" not in str(e.value) and name in str(e.value)
    (tmp_path / "ok.json").write_text('{"a": [1, {"b": 2}]}')
    assert safe_io.read_json(tmp_path / "ok.json") == {"a": [1, {"b": 2}]}


@pytest.fixture
def lib(tmp_path):
    lora = sd15_lora(NAMES, rank=1, seed=0)
    with Library.create(tmp_path / "lib", "sd15", Layout.from_lora(lora), embedder=None) as lib:
        lib.add(lora, "a")
        lib.add(sd15_lora(NAMES, rank=1, seed=1), "b")
        yield lib


def test_hostile_blob_path_is_reported_and_never_touched(lib, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    with sqlite3.connect(lib.root / "library.sqlite") as conn:
        conn.execute("UPDATE entries SET blob = '../../../victim' WHERE name = 'a'")
    report = lib.verify()
    assert not report.ok and len(report.hostile) == 1 and "HOSTILE" in "\n".join(report.lines())
    with pytest.raises(LibraryError, match="not a plain blob name"):
        lib.get("a")
    lib.remove("a")
    assert victim.read_text() == "keep" and [e.name for e in lib.list()] == ["b"]


def test_damaged_manifest_is_one_line_saying_what_to_do(lib):
    root = lib.root
    lib.close()
    db = root / "library.sqlite"
    db.write_bytes(b"garbage" * 1000)
    with pytest.raises(LibraryError, match="damaged.*re-import") as e:
        Library.open(root)
    assert "\n" not in str(e.value)


def test_clean_removes_temp_files_of_dead_processes_only(lib):
    from lorasynth.library.blobs import HOST

    tmp = lib.root / "blobs" / "tmp"
    dead = tmp / f".blob.{HOST}.{2**22 + 12345}.abc.tmp"  # above the default pid_max: no such process
    live = tmp / f".blob.{HOST}.{os.getpid()}.def.tmp"
    dead.write_bytes(b"x")
    live.write_bytes(b"y")
    assert lib.clean() == (0, 1)
    assert not dead.exists() and live.exists()


def test_reimport_repairs_a_corrupt_or_missing_blob(lib):
    entry, lora = lib.get("a")
    path = lib.blob_path(entry.blob)
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    assert not lib.verify().ok
    result = lib.add(lora, "again")
    assert result.duplicate and result.repaired and lib.verify().ok
    path.unlink()
    assert lib.add(lora, "again").repaired and lib.verify().ok
    assert not lib.add(lora, "again").repaired


def test_blend_rank_is_capped_at_what_the_modules_hold():
    from lorasynth.core.blending import blend

    a, b = sd15_lora(NAMES, rank=2, seed=0), sd15_lora(NAMES, rank=2, seed=1)
    out, report = blend([a, b], [1.0, 0.5], rank=100_000)
    assert report.rank == 4 and report.requested_rank == 100_000 and out.ranks == {4}


def test_samples_are_capped():
    from lorasynth.synthesis.synthesizer import MAX_SAMPLES, SynthesisSettings

    with pytest.raises(LorasynthError, match="more than"):
        SynthesisSettings(samples=MAX_SAMPLES + 1).validate()


@pytest.mark.parametrize("vec,why", [(np.zeros(8), "all zeros"), (np.ones((2, 4)), "1-D"), (np.full(8, 1e300), "norm"),
                                     (np.ones(8, complex), "complex"), (np.array(["a"] * 8), "numeric"),
                                     (np.array([1.0, np.nan]), "NaN")])
def test_bad_embeddings_are_refused(vec, why):
    from lorasynth.faces.embeddings import check_embedding

    with pytest.raises(LorasynthError, match=why):
        check_embedding(vec)
    assert np.isclose(np.linalg.norm(check_embedding(np.arange(1, 9))), 1.0)


def test_pack_with_nan_embeddings_is_refused(tmp_path):
    from lorasynth.library.pack import EMBEDDINGS_FILE, PackWriter, open_pack

    lora = sd15_lora(NAMES, rank=1)
    layout = Layout.from_lora(lora)
    vec = layout.flatten(lora).numpy()[None].repeat(3, axis=0)
    with PackWriter(tmp_path / "p", layout, n=3, embed_dim=4, embedder="dlib") as w:
        w.add_batch(vec, np.ones((3, 4), np.float32), ["a", "b", "c"])
    emb = np.load(tmp_path / "p" / EMBEDDINGS_FILE, mmap_mode="r+")
    emb[1, 2] = np.nan
    emb.flush()
    del emb
    pack = open_pack(tmp_path / "p")
    assert pack.read_embeddings([0]).shape == (1, 4)
    with pytest.raises(LibraryError, match="NaN"):
        pack.read_embeddings([0, 1])


def test_train_ids_outside_the_pack_are_a_clear_error():
    from types import SimpleNamespace

    from lorasynth.errors import ModelError
    from lorasynth.synthesis.synthesizer import Synthesizer

    fake = SimpleNamespace(model=SimpleNamespace(info=SimpleNamespace(train_ids=[0, 5, 99]), path="M"), pack=[0] * 10)
    with pytest.raises(ModelError, match="train_ids do not index"):
        Synthesizer.train_rows.fget(fake)
    fake.model.info.train_ids = [0, 9]
    assert Synthesizer.train_rows.fget(fake).tolist() == [0, 9]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_big_photos_are_decoded_smaller_with_the_scale_back_to_full_size(tmp_path, fmt):
    from PIL import Image

    from lorasynth.faces.images import load_image, load_image_scaled

    a = np.zeros((1000, 2000, 3), np.uint8)
    a[:100, :200] = 255  # a white block in the stored top-left corner
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # displayed rotated: the block ends up top-right
    path = tmp_path / f"big.{fmt.lower()}"
    im.save(path, format=fmt, exif=exif.tobytes())
    full = load_image(path)
    small, (sx, sy) = load_image_scaled(path, decode_pixels=200_000)
    assert full.shape == (2000, 1000, 3) and small.shape[0] * small.shape[1] <= 1.25 * 200_000
    assert sx == pytest.approx(full.shape[1] / small.shape[1]) and sy == pytest.approx(full.shape[0] / small.shape[0])
    f, s = np.argwhere(full[..., 0] > 200), np.argwhere(small[..., 0] > 200)
    assert np.abs(f.max(0) - (s.max(0) + 1) * [sy, sx]).max() <= 2 * max(sx, sy)
