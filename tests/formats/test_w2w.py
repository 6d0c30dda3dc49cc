"""weights2weights reader: a miniature in the exact w2w file layout, written here independently.

The expected LoRA is computed from raw row slices at the documented offsets (module 0 at 0,
attn1.to_v at 640, attn2.to_q at 1280, attn2.to_v at 1920, the last module at 98,560),
not with the code under test.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lorasynth.errors import FormatError, LayoutError
from lorasynth.formats.w2w import UntrustedPickleWarning, W2WDataset, w2w_key_to_module
from lorasynth.core.layout import Layout
from lorasynth.library import Library, import_w2w

N_VALUES = 99_648
BLOCKS = (
    [(f"down_blocks.{b}.attentions.{i}", (320, 640, 1280)[b]) for b in range(3) for i in range(2)]
    + [("mid_block.attentions.0", 1280)]
    + [(f"up_blocks.{b}.attentions.{i}", {1: 1280, 2: 640, 3: 320}[b]) for b in (1, 2, 3) for i in range(3)]
)


def w2w_tensors() -> list[tuple[str, tuple[int, int]]]:
    """(peft key, shape) of every w2w tensor, sorted by key as in the dataset rows."""
    out = []
    for block, c in BLOCKS:
        for target, fan_in in (("attn1.to_q", c), ("attn1.to_v", c), ("attn2.to_q", c), ("attn2.to_v", 768)):
            path = f"{block}.transformer_blocks.0.{target}"
            out.append((f"base_model.model.{path}.lora_A.weight", (1, fan_in)))
            out.append((f"base_model.model.{path}.lora_B.weight", (c, 1)))
    return sorted(out)


def write_miniature(root, rows, prefix="base_model.model.", count_style="size", order=None, identity=None):
    root.mkdir(parents=True, exist_ok=True)
    torch.save(rows, root / "all_weights.pt")
    tensors = w2w_tensors() if order is None else order
    dims = {}
    for key, shape in tensors:
        n = math.prod(shape)
        dims[key.replace("base_model.model.", prefix)] = (torch.Size([n]) if count_style == "size" else n, torch.Size(shape))
    torch.save(dims, root / "weight_dimensions.pt")
    if identity is not None:
        torch.save(identity, root / "identity_df.pt")
    return root


@pytest.fixture(scope="module")
def rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(4, N_VALUES, generator=g) * 0.01).float()


@pytest.fixture(scope="module")
def mini(tmp_path_factory, rows):
    identity = {"file": ["0", "1", "10", "2"], "Male": [1, -1, 1, -1], "Smiling": [-1, -1, 1, 1]}
    return write_miniature(tmp_path_factory.mktemp("w2w"), rows, identity=identity)


def test_miniature_layout_matches_documented_offsets():
    tensors = w2w_tensors()
    assert sum(math.prod(s) for _, s in tensors) == N_VALUES
    offsets, pos = {}, 0
    for key, shape in tensors:
        offsets[key] = pos
        pos += math.prod(shape)
    first = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0"
    assert offsets[f"{first}.attn1.to_q.lora_A.weight"] == 0
    assert offsets[f"{first}.attn1.to_v.lora_A.weight"] == 640
    assert offsets[f"{first}.attn2.to_q.lora_A.weight"] == 1280
    assert offsets[f"{first}.attn2.to_v.lora_A.weight"] == 1920
    assert offsets[tensors[-2][0]] == 98_560
    assert tensors[-2][0].endswith("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.lora_A.weight")


def test_row_to_lora_is_exactly_the_w2w_lora(mini, rows):
    ds = W2WDataset(mini)
    assert len(ds) == 4 and ds.weight_dimensions is not None
    tensors, pos = w2w_tensors(), 0
    slices = {}
    for key, shape in tensors:
        n = math.prod(shape)
        slices[key] = rows[2, pos : pos + n].reshape(shape)
        pos += n
    lora = ds.row_to_lora(2)
    assert len(lora) == 64
    a_keys = [key for key, _ in tensors[::2]]
    for i, key in enumerate(a_keys):
        path = key[len("base_model.model."): -len(".lora_A.weight")]
        a, b = slices[key], slices[key.replace("lora_A", "lora_B")]
        m = lora.modules[f"unet.{path}"]
        assert m.alpha == 27.0 and m.rank == 1
        assert torch.equal(m.down, a) and torch.equal(m.up, b)
        if i in (0, 1, 2, 3, 20, len(a_keys) - 1):  # full products only for a few (CPU time)
            expected = 27.0 * (b.double() @ a.double())
            assert (m.delta(torch.float64) - expected).abs().max().item() <= 1e-12
    # and the generic layout gives the very same LoRA
    ref = Layout.w2w().unflatten(rows[2], alpha=27.0)
    assert list(ref.modules) == list(lora.modules)
    assert all(torch.equal(ref.modules[n].down, lora.modules[n].down) for n in ref.modules)
    # a LoRA owns one row-sized copy, never a view into the whole memory-mapped matrix
    assert lora.modules[next(iter(lora.modules))].down.untyped_storage().nbytes() == N_VALUES * 4
    assert ds._row_offset is not None  # fast pread path found and checked
    assert torch.equal(ds.row(-1), rows[3]) and torch.equal(ds.row(0), rows[0])


@pytest.mark.parametrize("prefix,count_style", [("unet.", "int"), ("", "size"), ("base_model.model.unet.", "int")])
def test_key_spellings_accepted(tmp_path, rows, prefix, count_style):
    root = write_miniature(tmp_path / "w", rows[:1], prefix=prefix, count_style=count_style)
    ds = W2WDataset(root)
    assert torch.equal(ds.row_to_lora(0).modules[Layout.w2w().names[5]].up,
                       Layout.w2w().unflatten(rows[0]).modules[Layout.w2w().names[5]].up)


def test_key_parsing():
    assert w2w_key_to_module("base_model.model.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight") == (
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "down")
    assert w2w_key_to_module("unet.x.lora_B.weight") == ("unet.x", "up")
    assert w2w_key_to_module("something.else") is None


def test_wrong_order_or_shape_is_a_clear_error(tmp_path, rows):
    t = w2w_tensors()
    swapped = [t[2], t[3], t[0], t[1]] + t[4:]
    root = write_miniature(tmp_path / "order", rows[:1], order=swapped)
    with pytest.raises(FormatError, match=r"tensor #0 \(row offset 0\).*attn1.to_v"):
        W2WDataset(root)
    bad_shape = [(t[0][0], (1, 320)), (t[1][0], (640, 1))] + t[2:]
    root = write_miniature(tmp_path / "shape", rows[:1], order=bad_shape)
    with pytest.raises(FormatError, match="shape"):
        W2WDataset(root)


def test_wrong_row_width_refused(tmp_path):
    root = tmp_path / "w"
    root.mkdir()
    torch.save(torch.zeros(2, 100), root / "all_weights.pt")
    with pytest.raises(FormatError, match="99648"):
        W2WDataset(root)


class Evil:  # any non-allow-listed class must stop the safe loader
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_weight_dimensions_refused(tmp_path, rows):
    root = write_miniature(tmp_path / "w", rows[:1])
    torch.save({"x": Evil()}, root / "weight_dimensions.pt")
    with pytest.raises(FormatError, match="weights_only=True"):
        W2WDataset(root)


def test_identity_df_needs_trust(mini, tmp_path):
    ds = W2WDataset(mini)
    with pytest.raises(FormatError, match="trust"):
        ds.identity_attributes()
    lib = Library.create(tmp_path / "lib", "sd15", Layout.w2w(), embedder=None)
    report = import_w2w(lib, mini, 0, 2, trust_pickle=False, progress=False)
    assert len(report.added) == 2 and any("trust-pickle" in n for n in report.notes)
    assert lib.get("w2w-00001")[0].attributes == {"w2w_row": 1}


def test_import_w2w_streams_rows_with_attributes(mini, rows, tmp_path):
    lib = Library.create(tmp_path / "lib", "realistic-vision-v51", Layout.w2w(), embedder="dlib")
    with pytest.warns(UntrustedPickleWarning):
        report = import_w2w(lib, mini, start=1, stop=None, trust_pickle=True, batch_size=2, progress=False)
    assert report.ok and [r.name for r in report.added] == ["w2w-00001", "w2w-00002", "w2w-00003"]
    entry, lora = lib.get("w2w-00003")
    # identity rows are matched by sorted folder name: files sorted as strings "0","1","10","2"
    assert entry.attributes == {"w2w_row": 3, "w2w_file": "2", "celeba_Male": -1, "celeba_Smiling": 1}
    expected = Layout.w2w().unflatten(rows[3], alpha=27.0)
    for n, m in expected.modules.items():
        assert torch.equal(lora.modules[n].down, m.down) and torch.equal(lora.modules[n].up, m.up)
        assert lora.modules[n].alpha == 27.0
    # re-import: everything is a duplicate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrustedPickleWarning)
        again = import_w2w(lib, mini, 0, 4, trust_pickle=True, progress=False)
    assert len(again.added) == 1 and len(again.duplicates) == 3
    assert lib.verify().ok and len(lib) == 4


def test_import_w2w_needs_w2w_layout(mini, tmp_path):
    small = Layout(Layout.w2w().modules[:2])
    lib = Library.create(tmp_path / "lib", "sd15", small, embedder=None)
    with pytest.raises(LayoutError, match="w2w"):
        import_w2w(lib, mini, progress=False)


def test_nan_row_reported_not_fatal(tmp_path, rows):
    bad = rows[:3].clone()
    bad[1, 5] = float("nan")
    root = write_miniature(tmp_path / "w", bad)
    lib = Library.create(tmp_path / "lib", "sd15", Layout.w2w(), embedder=None)
    report = import_w2w(lib, root, progress=False)
    assert len(report.added) == 2 and len(report.errors) == 1 and report.errors[0][0] == "row 1"
    assert "non-finite" in report.errors[0][1]
