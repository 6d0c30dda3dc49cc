"""The on-disk pack: round trip, statistics, atomic writes, validation, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lorasynth.errors import LayoutError, LibraryError
from lorasynth.library.pack import PackDataset, PackWriter, open_pack, std_floor
from lorasynth.worlds.planted import SyntheticWorldConfig, make_world, tiny_layout, write_world_pack


@pytest.fixture(scope="module")
def world():
    return make_world(SyntheticWorldConfig(n_identities=64, layout=tiny_layout(), embed_dim=16, seed=1))


@pytest.fixture(scope="module")
def pack_dir(world, tmp_path_factory):
    return write_world_pack(world, tmp_path_factory.mktemp("packs") / "p", batch_size=10)


def test_round_trip(world, pack_dir):
    pack = open_pack(pack_dir)
    v = world.vectors(np.arange(64))
    assert pack.n == 64 and pack.dim == 768 and pack.embed_dim == 16 and len(pack) == 64
    assert pack.layout == world.layout and pack.meta["layout_signature"] == world.layout.signature
    assert pack.meta["canonical"] is True and pack.embedder == "synthetic"
    assert pack.ids == world.ids()
    np.testing.assert_array_equal(np.asarray(pack.vectors), v)
    np.testing.assert_array_equal(np.asarray(pack.embeddings), world.embeddings)
    np.testing.assert_array_equal(pack.read_rows([5, 3, 3, 63]), v[[5, 3, 3, 63]])
    np.testing.assert_array_equal(pack.read_embeddings([7]), world.embeddings[[7]])
    np.testing.assert_allclose(pack.mean, v.astype(np.float64).mean(0), atol=1e-5)
    np.testing.assert_allclose(pack.std, v.astype(np.float64).std(0), atol=1e-5)
    assert pack.index_of("id00007") == 7
    with pytest.raises(LibraryError):
        pack.index_of("nobody")
    # the files are plain formats readable without lorasynth
    assert np.load(pack_dir / "vectors.npy").shape == (64, 768)
    assert json.loads((pack_dir / "pack.json").read_text())["n"] == 64


def test_dataset_standardises_and_batches(world, pack_dir):
    pack = open_pack(pack_dir)
    ds = PackDataset(pack, idx=[2, 4, 6, 8])
    item = ds[1]
    expected = (world.vector(4) - pack.mean) / std_floor(pack.std)
    np.testing.assert_allclose(item["x"].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(item["embedding"].numpy(), world.embeddings[4])
    assert item["index"] == 4 and len(ds) == 4
    batch = next(iter(DataLoader(ds, batch_size=3, shuffle=False)))
    assert batch["x"].shape == (3, 768) and batch["x"].dtype == torch.float32
    assert batch["embedding"].shape == (3, 16) and batch["index"].tolist() == [2, 4, 6]
    full = torch.stack([PackDataset(pack)[i]["x"] for i in range(64)])
    assert full.mean(0).abs().max() < 1e-4  # standardised columns have zero mean
    with pytest.raises(IndexError):
        PackDataset(pack, idx=[64])


def test_std_floor():
    s = std_floor(np.array([0.0, 1.0, 2.0, 1e-9, 1.0], dtype=np.float32))  # median 1
    assert s[0] > 0 and s[1] == 1.0 and s[2] == 2.0 and s[3] == pytest.approx(1e-3)


def test_add_rows_and_trim(tmp_path):
    layout = tiny_layout()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5, layout.size)).astype(np.float32)
    with PackWriter(tmp_path / "p", layout, n=8, embed_dim=0, embedder="none") as w:
        for i, r in enumerate(rows):
            w.add(torch.from_numpy(r), None, f"e{i}")
    pack = open_pack(tmp_path / "p")  # planned 8, wrote 5: trimmed
    assert pack.n == 5 and pack.embed_dim == 0 and pack.ids == [f"e{i}" for i in range(5)]
    np.testing.assert_array_equal(pack.read_rows(np.arange(5)), rows)
    assert pack.read_embeddings([0, 1]).shape == (2, 0)
    np.testing.assert_allclose(pack.std, rows.astype(np.float64).std(0), atol=1e-5)
    assert PackDataset(pack)[0]["embedding"].shape == (0,)


def test_writer_is_atomic_on_exception(tmp_path):
    layout = tiny_layout()
    with pytest.raises(RuntimeError, match="boom"):
        with PackWriter(tmp_path / "p", layout, n=4, embed_dim=0) as w:
            w.add(np.zeros(layout.size), None, "a")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # no pack, no temporary leftovers
    with pytest.raises(LibraryError, match="empty"):
        with PackWriter(tmp_path / "p", layout, n=4, embed_dim=0):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writer_validates_rows(tmp_path):
    layout = tiny_layout()
    with pytest.raises(LayoutError):
        with PackWriter(tmp_path / "p", layout, n=2, embed_dim=0) as w:
            w.add(np.zeros(layout.size + 1))
    with pytest.raises(LibraryError, match="NaN"):
        with PackWriter(tmp_path / "p", layout, n=2, embed_dim=0) as w:
            w.add(np.full(layout.size, np.nan))
    with pytest.raises(LibraryError, match="duplicate"):
        with PackWriter(tmp_path / "p", layout, n=2, embed_dim=0) as w:
            w.add(np.zeros(layout.size), None, "x")
            w.add(np.zeros(layout.size), None, "x")
    with pytest.raises(LibraryError, match="embeddings"):
        with PackWriter(tmp_path / "p", layout, n=2, embed_dim=3) as w:
            w.add(np.zeros(layout.size), np.zeros(4), "x")
    with pytest.raises(LibraryError, match="more"):
        with PackWriter(tmp_path / "p", layout, n=1, embed_dim=0) as w:
            w.add_batch(np.zeros((2, layout.size)))
    assert list(tmp_path.iterdir()) == []


def test_overwrite(tmp_path, world):
    write_world_pack(world, tmp_path / "p", idx=[0, 1])
    with pytest.raises(LibraryError, match="exists"):
        write_world_pack(world, tmp_path / "p", idx=[2])
    write_world_pack(world, tmp_path / "p", idx=[2, 3, 4], overwrite=True)
    assert open_pack(tmp_path / "p").ids == world.ids([2, 3, 4])
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_packs_give_clear_errors(pack_dir, tmp_path):
    with pytest.raises(LibraryError, match="no pack"):
        open_pack(tmp_path / "missing")

    p = _copy(pack_dir, tmp_path / "a")
    (p / "pack.json").unlink()
    with pytest.raises(LibraryError, match="pack.json is missing"):
        open_pack(p)

    p = _copy(pack_dir, tmp_path / "b")
    (p / "pack.json").write_text("{not json")
    with pytest.raises(LibraryError, match="not valid JSON"):
        open_pack(p)

    p = _copy(pack_dir, tmp_path / "c")
    with open(p / "vectors.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(LibraryError, match="truncated"):
        open_pack(p)

    p = _copy(pack_dir, tmp_path / "d")
    meta = json.loads((p / "pack.json").read_text())
    meta["n"], meta["ids"] = 63, meta["ids"][:63]
    (p / "pack.json").write_text(json.dumps(meta))
    with pytest.raises(LibraryError, match="shape"):
        open_pack(p)

    p = _copy(pack_dir, tmp_path / "e")
    (p / "stats.safetensors").write_bytes(b"garbage")
    with pytest.raises(LibraryError, match="stats.safetensors"):
        open_pack(p)

    p = _copy(pack_dir, tmp_path / "f")
    meta = json.loads((p / "pack.json").read_text())
    meta["layout_signature"] = "0" * 16
    (p / "pack.json").write_text(json.dumps(meta))
    with pytest.raises(LibraryError, match="signature"):
        open_pack(p)

    p = _copy(pack_dir, tmp_path / "g")
    (p / "embeddings.npy").unlink()
    with pytest.raises(LibraryError, match="embeddings.npy"):
        open_pack(p)


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    import torch
    torch.set_num_threads(1)  # the collate copies are tiny; avoid thread oversubscription on shared cores
    from lorasynth.core.layout import Layout
    from lorasynth.library.pack import PackDataset, PackWriter, open_pack

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    out = sys.argv[1]
    layout = Layout.w2w()
    n, d, b = 2000, layout.size, 50
    base = np.random.default_rng(0).standard_normal((b, d)).astype(np.float32)
    start = rss_mb()
    with PackWriter(out, layout, n=n, embed_dim=512, embedder="test") as w:
        for k in range(0, n, b):
            w.add_batch(base + np.float32(k), np.zeros((b, 512), np.float32), [f"r{k + j}" for j in range(b)])
    after_write = rss_mb()
    pack = open_pack(out)
    from torch.utils.data import DataLoader

    loader = DataLoader(PackDataset(pack), batch_size=b, shuffle=True)
    peaks = []
    for epoch in range(2):
        for batch in loader:
            assert batch["x"].shape == (b, d)
        peaks.append(rss_mb())
    rows = pack.read_rows([0, n - 1])
    assert rows[1, 0] == base[-1, 0] + (n - b), rows[1, 0]
    print(start, after_write, *peaks)
    """
)


def test_rss_stays_bounded_for_a_large_pack(tmp_path):
    """2,000 x 99,648 (800 MB) written, then read twice (shuffled): RSS grows by a few batches only."""
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    start, after_write, epoch1, epoch2 = map(float, res.stdout.split())
    assert after_write - start < 100, (start, after_write)
    # reading: a few batches of 20 MB (plus what glibc keeps cached of freed ones), not the 800 MB
    assert epoch1 - start < 300, (start, epoch1)
    assert epoch2 - epoch1 < 50, (epoch1, epoch2)  # a second pass over the data adds nothing
    assert (tmp_path / "big" / "vectors.npy").stat().st_size > 2000 * 99648 * 4
