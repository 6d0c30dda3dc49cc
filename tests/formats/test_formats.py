import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from lorasynth.errors import FormatError
from lorasynth.formats import detect_file_format, load_lora, save_lora
from lorasynth.core import safe_io
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
    with pytest.warns(UserWarning, match="no adapter_config.json"):
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
    from lorasynth.core.safe_io import safetensors_bytes, write_bytes

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


# ----------------------------------------------------------------------------- issue 11: files every tool reads right

import hashlib
import warnings

from lorasynth.formats import FormatWarning, merged_metadata, synthesized_metadata
from lorasynth.formats.metadata import lora_file_hash

TE_V = f"{TE}.self_attn.v_proj"


def _cli(argv, capsys):
    from lorasynth.apps.cli.main import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_kohya_writes_one_alpha_with_mixed_ranks_and_alphas(tmp_path):
    lora = sd15_lora(NAMES[:2], rank=4, alpha=8.0)
    lora.modules.update(sd15_lora([TE_V], rank=2, alpha=27.0, seed=3).modules)
    lora.modules[NAMES[1]].alpha = 0.5
    tensors, meta = safe_io.read_safetensors(save_lora(lora, tmp_path / "m.safetensors"))
    alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    assert alphas == {8.0} and meta["ss_network_alpha"] == "8"
    assert max_delta_diff(load_lora(tmp_path / "m.safetensors"), lora) < 1e-5


def test_diffusers_metadata_targets_have_no_text_model_prefix(tmp_path):
    lora = sd15_lora([NAMES[0], NAMES[2], TE_V], rank=2)
    lora.modules[TE_V].alpha = 5.0
    _, meta = safe_io.read_safetensors(save_lora(lora, tmp_path / "d.safetensors", "diffusers"))
    flat = json.loads(meta["lora_adapter_metadata"])
    assert flat["text_encoder.target_modules"] == ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.v_proj"]
    assert flat["text_encoder.alpha_pattern"] == {"encoder.layers.0.self_attn.v_proj": 5.0}
    assert all("text_model" not in t for t in flat["unet.target_modules"])
    assert max_delta_diff(load_lora(tmp_path / "d.safetensors"), lora) == 0


def test_diffusers_reader_accepts_text_encoder_keys_without_text_model(tmp_path):
    lora = sd15_lora([TE_V], rank=2, alpha=2.0)
    m = lora.modules[TE_V]
    save_file({"text_encoder.encoder.layers.0.self_attn.v_proj.lora_A.weight": m.down,
               "text_encoder.encoder.layers.0.self_attn.v_proj.lora_B.weight": m.up}, tmp_path / "t5.safetensors")
    assert set(load_lora(tmp_path / "t5.safetensors").modules) == {TE_V}


def test_peft_writer_is_the_w2w_layout_and_reads_back(tmp_path, capsys):
    from peft import LoraConfig

    lora = sd15_lora([NAMES[0], NAMES[1]], rank=1, alpha=27.0)
    lora.modules[NAMES[1]].alpha = 5.0
    written = save_lora(lora, tmp_path / "adapter", "peft")
    assert written == tmp_path / "adapter" / "adapter_model.safetensors"
    tensors, _ = safe_io.read_safetensors(written)
    assert f"base_model.model.{NAMES[0].split('.', 1)[1]}.lora_A.weight" in tensors
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 1 and cfg["lora_alpha"] == 27.0 and cfg["peft_type"] == "LORA"
    assert LoraConfig.from_pretrained(str(tmp_path / "adapter")).alpha_pattern == {NAMES[1].split(".", 1)[1]: 5.0}
    assert max_delta_diff(load_lora(tmp_path / "adapter"), lora) == 0
    with pytest.raises(FormatError, match="peft adapter holds one model"):
        save_lora(sd15_lora(NAMES, rank=1), tmp_path / "both", "peft")
    k = save_lora(lora, tmp_path / "k.safetensors")
    rc, out, _ = _cli(["convert", k, tmp_path / "via_cli", "--to", "peft"], capsys)
    assert rc == 0 and "adapter_model.safetensors" in out
    assert max_delta_diff(load_lora(tmp_path / "via_cli"), lora) < 1e-5


def test_sgm_named_kohya_keys_map_to_diffusers_modules(tmp_path):
    names = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": f"{ATTN}.attn1.to_q",
        "lora_unet_middle_block_1_proj_in": "unet.mid_block.attentions.0.proj_in",
        "lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_v":
            "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v",
        "lora_unet_input_blocks_4_0_in_layers_2": "unet.down_blocks.1.resnets.0.conv1",
        "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsamplers.0.conv",
        "lora_unet_output_blocks_2_1_conv": "unet.up_blocks.0.upsamplers.0.conv",
    }
    lora = sd15_lora(list(names.values()), rank=2, alpha=1.0)
    tensors = {}
    for sgm, name in names.items():
        m = lora.modules[name]
        tensors.update({f"{sgm}.lora_down.weight": m.down, f"{sgm}.lora_up.weight": m.up, f"{sgm}.alpha": torch.tensor(1.0)})
    save_file(tensors, tmp_path / "sgm.safetensors")
    assert max_delta_diff(load_lora(tmp_path / "sgm.safetensors"), lora) == 0


def test_unprefixed_attention_processor_keys(tmp_path):
    name = f"{ATTN}.attn2.to_k"
    lora = sd15_lora([name], rank=2)
    m = lora.modules[name]
    path = name.split(".", 1)[1].replace(".to_k", ".processor.to_k_lora")
    save_file({f"{path}.down.weight": m.down, f"{path}.up.weight": m.up}, tmp_path / "procs.safetensors")
    loaded = load_lora(tmp_path / "procs.safetensors")
    assert detect_file_format(tmp_path / "procs.safetensors") == "diffusers"
    assert set(loaded.modules) == {name} and loaded.modules[name].scale == 1.0


def test_bundled_embeddings_are_skipped_with_a_warning(tmp_path, capsys):
    k = kohya_name(NAMES[0])
    m = sd15_lora(NAMES[:1]).modules[NAMES[0]]
    save_file({f"{k}.lora_down.weight": m.down, f"{k}.lora_up.weight": m.up, f"{k}.alpha": torch.tensor(8.0),
               "bundle_emb.sks.string_to_param.*": torch.randn(2, 768)}, tmp_path / "b.safetensors")
    with pytest.warns(FormatWarning, match="skipped 1 bundled textual-inversion embedding"):
        loaded = load_lora(tmp_path / "b.safetensors")
    assert set(loaded.modules) == {NAMES[0]}
    rc, _, err = _cli(["inspect", tmp_path / "b.safetensors"], capsys)
    assert rc == 0 and err.startswith("lorasynth: warning:") and err.count("\n") == 1
    save_file({"bundle_emb.sks.string_to_param.*": torch.randn(2, 768)}, tmp_path / "only.safetensors")
    with pytest.warns(FormatWarning), pytest.raises(FormatError, match="holds no LoRA modules"):
        load_lora(tmp_path / "only.safetensors")


def test_peft_without_config_warns_and_alpha_overrides(tmp_path, capsys):
    lora = sd15_lora(NAMES[:2], rank=1, alpha=27.0)
    save_lora(lora, tmp_path / "a", "peft")
    (tmp_path / "a" / "adapter_config.json").unlink()
    with pytest.warns(FormatWarning, match="no adapter_config.json"):
        assert load_lora(tmp_path / "a").modules[NAMES[0]].alpha == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert max_delta_diff(load_lora(tmp_path / "a", alpha=27), lora) == 0
    rc, out, err = _cli(["inspect", tmp_path / "a" / "adapter_model.safetensors", "--json"], capsys)
    assert rc == 0 and "no adapter_config.json" in err and json.loads(out)["alphas"] == [1.0]
    rc, out, err = _cli(["inspect", tmp_path / "a", "--json", "--alpha", "27"], capsys)
    assert rc == 0 and err == "" and json.loads(out)["alphas"] == [27.0]


@pytest.mark.parametrize("meta,match", [
    ("[1, 2]", "expected a JSON object, got a JSON array"),
    ('{"unet.lora_alpha": "abc", "unet.r": 2}', "lora_alpha must be a finite number"),
    ('{"unet.r": 0}', "r must be >= 1"),
    ('{"unet.alpha_pattern": [1]}', "alpha_pattern must be a JSON object"),
    ('{"unet.alpha_pattern": {"to_q": "x"}}', "alpha_pattern"),
    ('{"unet.use_dora": true}', "DoRA"),
    ("{" * 100000, "not valid JSON|nested [0-9]+ levels deep"),
])
def test_diffusers_metadata_is_validated(tmp_path, meta, match):
    m = sd15_lora(NAMES[:1]).modules[NAMES[0]]
    save_file({f"{NAMES[0]}.lora_A.weight": m.down, f"{NAMES[0]}.lora_B.weight": m.up}, tmp_path / "d.safetensors",
              metadata={"lora_adapter_metadata": meta})
    with pytest.raises(FormatError, match=match) as e:
        load_lora(tmp_path / "d.safetensors")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("raw,match", [
    (b"[1, 2]", "expected a JSON object, got a JSON array"),
    (b'{"r": 1, "lora_alpha": "27"}', "lora_alpha must be a finite number"),
    (b'{"r": "1"}', "r must be an integer"),
    (b'{"lora_alpha": 27, "use_rslora": "yes"}', "use_rslora must be true or false"),
    (b"\xff\xfe{", "not UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[" * 100000, "not valid JSON|nested [0-9]+ levels deep"),
])
def test_adapter_config_is_validated(tmp_path, raw, match):
    save_lora(sd15_lora(NAMES[:1], rank=1), tmp_path / "a", "peft")
    (tmp_path / "a" / "adapter_config.json").write_bytes(raw)
    with pytest.raises(FormatError, match=match) as e:
        load_lora(tmp_path / "a")
    assert "\n" not in str(e.value) and "adapter_config.json" in str(e.value)


def test_factor_shapes_and_module_names_are_checked(tmp_path):
    k = kohya_name(NAMES[0])  # attn1.to_q of down_blocks.0 is 320 x 320
    save_file({f"{k}.lora_down.weight": torch.randn(2, 640), f"{k}.lora_up.weight": torch.randn(320, 2)},
              tmp_path / "k.safetensors")
    with pytest.raises(FormatError, match=r"factors for a \(320, 640\) weight; the SD1.5 .* has \(320, 320\)"):
        load_lora(tmp_path / "k.safetensors")
    save_file({f"{NAMES[0]}.lora_A.weight": torch.randn(2, 321), f"{NAMES[0]}.lora_B.weight": torch.randn(320, 2)},
              tmp_path / "d.safetensors")
    with pytest.raises(FormatError, match="factors for a"):
        load_lora(tmp_path / "d.safetensors")
    bogus = "unet.down_blocks.0.attentions.7.transformer_blocks.0.attn1.to_q"
    save_file({f"{bogus}.lora_A.weight": torch.randn(2, 320), f"{bogus}.lora_B.weight": torch.randn(320, 2)},
              tmp_path / "x.safetensors")
    with pytest.raises(FormatError, match="does not exist in the SD1.5"):
        load_lora(tmp_path / "x.safetensors")
    te = kohya_name(TE_V)
    save_file({f"{te}.lora_down.weight": torch.randn(2, 320), f"{te}.lora_up.weight": torch.randn(768, 2)},
              tmp_path / "te.safetensors")
    with pytest.raises(FormatError, match="has factors for a"):
        load_lora(tmp_path / "te.safetensors")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_rank_zero_is_refused(tmp_path, fmt):
    keys = ((f"{kohya_name(NAMES[0])}.lora_down.weight", f"{kohya_name(NAMES[0])}.lora_up.weight") if fmt == "kohya"
            else (f"{NAMES[0]}.lora_A.weight", f"{NAMES[0]}.lora_B.weight"))
    save_file({keys[0]: torch.zeros(0, 320), keys[1]: torch.zeros(320, 0)}, tmp_path / "r0.safetensors")
    with pytest.raises(FormatError, match="rank 0"):
        load_lora(tmp_path / "r0.safetensors")
    from lorasynth.core.lora import LoRA, LoRAModule

    with pytest.raises(FormatError, match="rank 0"):
        save_lora(LoRA({NAMES[0]: LoRAModule(torch.zeros(0, 320), torch.zeros(320, 0), 1.0)}), tmp_path / "w.safetensors", fmt)
    assert not (tmp_path / "w.safetensors").exists()


def test_full_checkpoint_is_named_as_such(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(FormatError, match="full Stable Diffusion checkpoint") as e:
        load_lora(tmp_path / "ckpt.safetensors")
    assert "LyCORIS" not in str(e.value)
    save_file({"lora_unet_x.diff": torch.zeros(2, 2)}, tmp_path / "full.safetensors")
    with pytest.raises(FormatError, match="LyCORIS 'full'"):
        load_lora(tmp_path / "full.safetensors")


def test_text_encoder_q_v_only_gets_a_zero_out_proj_for_diffusers(tmp_path):
    lora = sd15_lora([f"{TE}.self_attn.q_proj", TE_V], rank=2, alpha=1.0)
    tensors, meta = safe_io.read_safetensors(save_lora(lora, tmp_path / "te.safetensors"))
    out = kohya_name(f"{TE}.self_attn.out_proj")
    assert not tensors[f"{out}.lora_up.weight"].any() and json.loads(meta["lorasynth.placeholder_modules"])
    back = load_lora(tmp_path / "te.safetensors")
    assert set(back.modules) == set(lora.modules) and "lorasynth.placeholder_modules" not in back.metadata
    assert "lorasynth.placeholder_modules" not in safe_io.read_safetensors(
        save_lora(back, tmp_path / "d.safetensors", "diffusers"))[1]


def test_metadata_conventions_hashes_and_carry_over(tmp_path, capsys):
    lora = sd15_lora(NAMES[:2], rank=2)
    lora.metadata.update(synthesized_metadata("sks person", base_model="runwayml/stable-diffusion-v1-5"))
    lora.metadata["ss_training_comment"] = "kept"
    path = save_lora(lora, tmp_path / "me.safetensors")
    _, meta = safe_io.read_safetensors(path)
    assert meta["modelspec.trigger_phrase"] == "sks person"
    assert json.loads(meta["ss_tag_frequency"]) == {"lorasynth": {"sks person": 1}}
    assert meta["ss_sd_model_name"] == "runwayml/stable-diffusion-v1-5" and meta["ss_output_name"] == "me"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest() == lora_file_hash(path)
    assert len(meta["sshs_legacy_hash"]) == 8
    # convert keeps the source's ss_*/modelspec.* (and its own output name), regenerates format keys
    for fmt in ("diffusers", "kohya"):
        rc, _, _ = _cli(["convert", path, tmp_path / f"c_{fmt}.safetensors", "--to", fmt], capsys)
        assert rc == 0
        _, m2 = safe_io.read_safetensors(tmp_path / f"c_{fmt}.safetensors")
        for key in ("modelspec.trigger_phrase", "ss_tag_frequency", "ss_sd_model_name", "ss_training_comment", "ss_output_name"):
            assert m2[key] == meta[key], (fmt, key)
        assert "lorasynth.source_format" not in m2
    # blend: merged_from, triggers united, shared values kept
    other = sd15_lora(NAMES[:1], rank=2, seed=5)
    other.metadata.update(synthesized_metadata("ohwx woman", base_model="runwayml/stable-diffusion-v1-5"))
    o = save_lora(other, tmp_path / "her.safetensors")
    rc, _, _ = _cli(["blend", f"{path}=0.5", f"{o}=0.5", "-o", tmp_path / "mix.safetensors"], capsys)
    assert rc == 0
    _, mix = safe_io.read_safetensors(tmp_path / "mix.safetensors")
    assert mix["modelspec.merged_from"] == "me.safetensors, her.safetensors"
    assert mix["modelspec.trigger_phrase"] == "sks person, ohwx woman"
    assert json.loads(mix["ss_tag_frequency"]) == {"lorasynth": {"sks person": 1, "ohwx woman": 1}}
    assert mix["ss_sd_model_name"] == "runwayml/stable-diffusion-v1-5" and mix["ss_output_name"] == "mix"
    assert merged_metadata([("a", {"modelspec.title": "a"})])["modelspec.merged_from"] == "a"


def test_inspect_separates_file_metadata_from_inferred(tmp_path, capsys):
    lora = sd15_lora(NAMES[:1])
    lora.metadata["ss_tag_frequency"] = "{}"
    path = save_lora(lora, tmp_path / "i.safetensors", "diffusers")
    rc, out, _ = _cli(["inspect", path, "--json"], capsys)
    info = json.loads(out)
    assert rc == 0 and info["format"] == "diffusers"
    assert info["file_metadata"] == safe_io.read_safetensors(path)[1]  # exactly the header, nothing added
    rc, out, _ = _cli(["inspect", path], capsys)
    assert "read from the weights:" in out and "file metadata (" in out


def test_cli_offers_every_save_format():
    from lorasynth.apps.cli.lora_files import SAVE_FORMATS as CLI_FORMATS
    from lorasynth.formats import SAVE_FORMATS

    assert CLI_FORMATS == SAVE_FORMATS == ("kohya", "diffusers", "peft")


def test_a1111_infotext(tmp_path):
    from lorasynth.apps.cli.generate import infotext_fields
    from lorasynth.runtime.pipeline import GenerationSettings, format_parameters

    lora_path = save_lora(sd15_lora(NAMES[:1]), tmp_path / "me.safetensors")
    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"pretend checkpoint")
    extra, tags = infotext_fields(str(ckpt), [(str(lora_path), 0.8)])
    text = format_parameters(GenerationSettings(prompt="a photo of sks person", steps=20, scheduler="dpm"), extra, tags)
    first, params = text.splitlines()
    assert first == "a photo of sks person <lora:me:0.8>"
    assert params.startswith("Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 0, Size: 512x512")
    assert f"Model hash: {hashlib.sha256(b'pretend checkpoint').hexdigest()[:10]}, Model: base" in params
    assert f'Lora hashes: "me: {lora_file_hash(lora_path)[:12]}"' in params
