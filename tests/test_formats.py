import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from lorasynth.errors import FormatError
from lorasynth.formats import detect_file_format, load_lora, save_lora
from lorasynth.formats import safe_io
from lorasynth.formats.keys import kohya_name

from helpers import ATTN, TE, max_delta_diff, random_lora, sd15_lora

NAMES = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_v", f"{TE}.self_attn.q_proj"]


def _mixed_lora():
    lora = sd15_lora(NAMES, rank=4, alpha=8.0)
    conv = random_lora({"unet.down_blocks.0.resnets.0.conv1": (320, 320, 3, 3)}, rank=2, alpha=1.0, seed=5)
    lora.modules.update(conv.modules)
    lora.modules[NAMES[1]].alpha = 3.0  # per-module alphas differ
    return lora


def test_kohya_keys_and_metadata(tmp_path):
    path = save_lora(_mixed_lora(), tmp_path / "x.safetensors")
    tensors, meta = safe_io.read_safetensors(path)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert f"{key}.lora_down.weight" in tensors and tensors[f"{key}.alpha"].ndim == 0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "4" and meta["ss_output_name"] == "x"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2"


def test_round_trip_kohya_diffusers_kohya_is_exact(tmp_path):
    lora = _mixed_lora()
    k1 = save_lora(lora, tmp_path / "a.safetensors", "kohya")
    d = save_lora(load_lora(k1), tmp_path / "b.safetensors", "diffusers")
    assert detect_file_format(d) == "diffusers"
    back = load_lora(d)
    k2 = save_lora(back, tmp_path / "c.safetensors", "kohya")
    t1, _ = safe_io.read_safetensors(k1)
    t2, _ = safe_io.read_safetensors(k2)
    assert t1.keys() == t2.keys()
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    # the kohya file has one alpha (8, the most common); module alphas 3 and 1 are folded into up
    assert {float(t1[k]) for k in t1 if k.endswith(".alpha")} == {8.0}
    assert max_delta_diff(back, lora) < 1e-5
    assert back.modules[NAMES[0]].alpha == 8.0 and torch.equal(back.modules[NAMES[0]].up, lora.modules[NAMES[0]].up)


def test_kohya_without_alpha_means_scale_one(tmp_path):
    lora = sd15_lora(NAMES[:1], rank=4)
    k = kohya_name(NAMES[0])
    m = lora.modules[NAMES[0]]
    save_file({f"{k}.lora_down.weight": m.down, f"{k}.lora_up.weight": m.up}, tmp_path / "n.safetensors")
    loaded = load_lora(tmp_path / "n.safetensors")
    assert loaded.modules[NAMES[0]].scale == 1.0


def test_peft_layout_uses_adapter_config_alpha(tmp_path):
    lora = sd15_lora(NAMES[:2], rank=2, alpha=2.0)
    tensors = {}
    for n, m in lora.modules.items():
        path = n.split(".", 1)[1]
        tensors[f"base_model.model.{path}.lora_A.weight"] = m.down
        tensors[f"base_model.model.{path}.lora_B.weight"] = m.up
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    no_cfg = load_lora(tmp_path / "adapter_model.safetensors")
    assert no_cfg.modules[NAMES[0]].alpha == 2 and "lorasynth.warning" in no_cfg.metadata
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"r": 2, "lora_alpha": 27, "alpha_pattern": {"attn2.to_v": 5}, "target_modules": ["to_q", "to_v"]}))
    loaded = load_lora(tmp_path / "adapter_model.safetensors")
    assert detect_file_format(tmp_path / "adapter_model.safetensors") == "peft"
    assert loaded.modules[NAMES[0]].alpha == 27 and loaded.modules[NAMES[1]].alpha == 5
    assert torch.allclose(loaded.modules[NAMES[0]].delta(), 13.5 * lora.modules[NAMES[0]].up @ lora.modules[NAMES[0]].down)


def test_peft_rslora_scale(tmp_path):
    lora = sd15_lora(NAMES[:1], rank=4)
    m = lora.modules[NAMES[0]]
    path = NAMES[0].split(".", 1)[1]
    save_file({f"base_model.model.{path}.lora_A.weight": m.down, f"base_model.model.{path}.lora_B.weight": m.up},
              tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True}))
    loaded = load_lora(tmp_path / "adapter_model.safetensors")
    assert loaded.modules[NAMES[0]].scale == pytest.approx(8 / 2)  # alpha / sqrt(r)


def test_diffusers_legacy_processor_keys(tmp_path):
    lora = sd15_lora([f"{ATTN}.attn1.to_out.0"], rank=2, alpha=2.0)
    m = lora.modules[f"{ATTN}.attn1.to_out.0"]
    save_file({f"{ATTN}.attn1.processor.to_out_lora.down.weight": m.down,
               f"{ATTN}.attn1.processor.to_out_lora.up.weight": m.up}, tmp_path / "legacy.safetensors")
    loaded = load_lora(tmp_path / "legacy.safetensors")
    assert max_delta_diff(loaded, lora) == 0


# ----------------------------------------------------------------------------- bad input

class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/lorasynth_pwned_marker",))


@pytest.mark.parametrize("name", ["evil.pt", "evil.safetensors"])
def test_pickles_are_refused_and_never_unpickled(tmp_path, name):
    import os
    marker = "/tmp/lorasynth_pwned_marker"
    if os.path.exists(marker):
        os.remove(marker)
    torch.save({"x": _Boom()}, tmp_path / name)
    with pytest.raises(FormatError, match="pickled"):
        load_lora(tmp_path / name)
    (tmp_path / "raw.safetensors").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(FormatError, match="pickled"):
        load_lora(tmp_path / "raw.safetensors")
    assert not os.path.exists(marker)


def test_not_safetensors_truncated_and_oversized_header(tmp_path):
    (tmp_path / "t.safetensors").write_text("hello world, not a tensor file")
    with pytest.raises(FormatError, match="not a safetensors file"):
        load_lora(tmp_path / "t.safetensors")
    good = save_lora(sd15_lora(NAMES[:1]), tmp_path / "g.safetensors")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="truncated"):
        load_lora(tmp_path / "cut.safetensors")
    (tmp_path / "big.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(FormatError, match="header claims"):
        load_lora(tmp_path / "big.safetensors")
    (tmp_path / "json.safetensors").write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(FormatError, match="not JSON"):
        load_lora(tmp_path / "json.safetensors")


@pytest.mark.parametrize("keys,match", [
    ({"foo.bar.weight": (2, 2), "something_else": (1,)}, "unrecognized LoRA keys: foo.bar.weight"),
    ({"lora_unet_x.hada_w1_a": (2, 2)}, "LoHa"),
    ({"lora_unet_x.lokr_w1": (2, 2)}, "LoKr"),
    ({"unet.x.lora_magnitude_vector": (2,)}, "DoRA"),
    ({"lora_unet_x.dora_scale": (2,)}, "DoRA"),
    ({"lora_te1_text_model_x.lora_down.weight": (2, 2)}, "SDXL"),
    ({"lora_unet_not_a_module.lora_down.weight": (2, 4), "lora_unet_not_a_module.lora_up.weight": (4, 2)},
     "not found in the SD1.5"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (2, 320)},
     "missing their down or up"),
])
def test_unknown_and_unsupported_keys(tmp_path, keys, match):
    save_file({k: torch.zeros(s) for k, s in keys.items()}, tmp_path / "u.safetensors")
    with pytest.raises(FormatError, match=match):
        load_lora(tmp_path / "u.safetensors")


def test_nan_and_rank_mismatch(tmp_path):
    k = kohya_name(NAMES[0])
    down = torch.randn(2, 320)
    down[0, 0] = float("nan")
    save_file({f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": torch.randn(320, 2)}, tmp_path / "nan.safetensors")
    with pytest.raises(FormatError, match="NaN/Inf"):
        load_lora(tmp_path / "nan.safetensors")
    save_file({f"{k}.lora_down.weight": torch.randn(2, 320), f"{k}.lora_up.weight": torch.randn(320, 3)},
              tmp_path / "rk.safetensors")
    with pytest.raises(FormatError, match="rank mismatch"):
        load_lora(tmp_path / "rk.safetensors")


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = save_lora(sd15_lora(NAMES[:1], seed=1), tmp_path / "keep.safetensors")
    before = path.read_bytes()

    real_fsync = safe_io.os.fsync

    def broken(fd):  # the temp file is fully written, then the disk fails
        raise OSError("disk full")

    monkeypatch.setattr(safe_io.os, "fsync", broken)
    with pytest.raises(OSError):
        save_lora(sd15_lora(NAMES[:1], seed=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]
    monkeypatch.setattr(safe_io.os, "fsync", real_fsync)


def test_writes_are_deterministic(tmp_path):
    lora = sd15_lora(NAMES, seed=4)
    lora.metadata.update({f"lorasynth.k{i}": str(i) for i in range(20)})
    a = save_lora(lora, tmp_path / "a" / "x.safetensors").read_bytes()
    b = save_lora(lora, tmp_path / "b" / "x.safetensors").read_bytes()
    assert a == b
    assert load_lora(tmp_path / "a" / "x.safetensors").metadata["lorasynth.k7"] == "7"


def test_save_refuses_nan_and_unknown_format(tmp_path):
    lora = sd15_lora(NAMES[:1])
    with pytest.raises(FormatError, match="cannot save as"):
        save_lora(lora, tmp_path / "x.safetensors", "ckpt")
    lora.modules[NAMES[0]].up[0, 0] = float("inf")
    with pytest.raises(FormatError, match="NaN/Inf"):
        save_lora(lora, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_header_length_starting_with_pickle_opcode_is_not_a_pickle(tmp_path):
    # e.g. a 0x580-byte header: the file starts with 0x80 0x05 like a protocol-5 pickle
    from lorasynth.formats.safe_io import safetensors_bytes, write_bytes

    lora = sd15_lora(NAMES[:1])
    for pad in range(400):
        lora.metadata["pad"] = "x" * pad
        data = safetensors_bytes(*__import__("lorasynth.formats.kohya", fromlist=["to_kohya"]).to_kohya(lora, tmp_path / "p"))
        if data[0] == 0x80 and 2 <= data[1] <= 5:
            break
    assert data[0] == 0x80 and 2 <= data[1] <= 5
    write_bytes(tmp_path / "p.safetensors", data)
    assert load_lora(tmp_path / "p.safetensors").metadata["pad"] == lora.metadata["pad"]


def test_reader_matches_safetensors_for_every_dtype_and_odd_offsets(tmp_path):
    """The one-buffer reader gives safetensors' own tensors, including bf16/fp16, 0-d, empty,
    a misaligned float (written by hand: safetensors itself aligns) and fp8 (via safetensors)."""
    from safetensors.torch import load_file

    tensors = {
        "a_u8": torch.arange(3, dtype=torch.uint8),
        "b_f32": torch.randn(4, 5),
        "c_bf16": torch.randn(3, 2).to(torch.bfloat16),
        "d_f16": torch.randn(7).to(torch.float16),
        "e_scalar": torch.tensor(2.5),
        "f_empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"k": "v"})
    ours, meta = safe_io.read_safetensors(tmp_path / "t.safetensors")
    theirs = load_file(tmp_path / "t.safetensors")
    assert meta == {"k": "v"} and ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    # other writers may not align: a float32 tensor starting at byte 3 of the data
    header = {"u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [3, 19]}}
    raw = json.dumps(header).encode()
    w = torch.randn(2, 2)
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes([1, 2, 3]) + w.numpy().tobytes())
    odd, _ = safe_io.read_safetensors(tmp_path / "odd.safetensors")
    assert torch.equal(odd["w"], w) and odd["u"].tolist() == [1, 2, 3]
    header["u"]["shape"] = [-1, 0]  # hostile: a negative dimension of an empty tensor
    raw = json.dumps(header).encode()
    (tmp_path / "neg.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(19))
    with pytest.raises(FormatError, match="negative dimension"):
        safe_io.read_safetensors(tmp_path / "neg.safetensors")
    fp8 = {"x": torch.randn(4).to(torch.float8_e4m3fn)}
    save_file(fp8, tmp_path / "f8.safetensors")
    back, _ = safe_io.read_safetensors(tmp_path / "f8.safetensors")
    assert torch.equal(back["x"].float(), fp8["x"].float())


def test_finite_check_names_the_module_and_accepts_huge_finite_values():
    lora = sd15_lora(NAMES, rank=4)
    big = lora.modules[NAMES[0]]
    big.down.fill_(3e38)  # finite, but any sum of these overflows to inf
    lora.check_finite()
    lora.modules[NAMES[2]].up[0, 0] = float("nan")
    with pytest.raises(FormatError, match="self_attn.q_proj has NaN/Inf values in its up"):
        lora.check_finite()


def test_numpy_and_torch_writers_give_the_same_bytes(monkeypatch):
    """safetensors_bytes takes safetensors' faster numpy writer when numpy has every dtype."""
    tensors = {"w": torch.randn(4, 3), "h": torch.randn(5).half(), "i": torch.arange(3), "b": torch.tensor([True])}
    fast = safe_io.safetensors_bytes(tensors, {"k": "v"})
    monkeypatch.setattr(safe_io, "_NUMPY_DTYPES", set())
    assert safe_io.safetensors_bytes(tensors, {"k": "v"}) == fast
