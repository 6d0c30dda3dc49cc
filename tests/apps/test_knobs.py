"""Issue 20 #7, #9, #10: ids and knobs through one number parser in the CLI, the Python API and ComfyUI.

* entry ids ``²``, ``³`` (``str.isdigit``) and ids >= 2**63 are one clear error, never a traceback;
* NaN / inf / 1e308 weights and knobs are refused (``lorasynth.blend``, ``Synthesizer(guidance=nan)``,
  the ComfyUI nodes), never turned into a NaN LoRA;
* ``synthesize --guidance -1`` is refused by the CLI with the rule (and words) the server uses;
* ``serve --max-upload-mb nan`` / ``-1`` are one line;
* ComfyUI's model list ends on a symlink loop.
"""

from __future__ import annotations

import sys
import threading
import types

import numpy as np
import pytest

import lorasynth
from lorasynth.apps.cli.main import main
from lorasynth.errors import InputError, LibraryError, LorasynthError

from helpers import ATTN, build_untrained_model, sd15_lora

NAMES_TINY = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_v"]

HOSTILE_FLOATS = [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, "nan", "inf", "1e999", "abc", True, None, [1]]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lorasynth: error: "), err
    return lines[0]


def run_cli(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse's refusals
        return e.code


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_untrained_model(tmp_path_factory.mktemp("knobs"))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("knoblib")
    lora_file = root / "a.safetensors"
    sd15_lora(NAMES_TINY, seed=1).save(lora_file)
    assert main(["library", "init", str(root / "lib"), "--base", "sd15", "--layout", str(lora_file)]) == 0
    assert main(["library", "add", str(root / "lib"), str(lora_file), "--name", "first"]) == 0
    return root / "lib"


# --------------------------------------------------------------------------- entry ids


@pytest.mark.parametrize("ref", ["²", "³", "١", "9223372036854775808", "99999999999999999999999999", "-1", "1e3"])
@pytest.mark.parametrize("command", ["show", "export", "remove"])
def test_odd_entry_ids_are_one_line(lib, tmp_path, capsys, ref, command):
    argv = ["library", command, lib, ref] + ([tmp_path / "out.safetensors"] if command == "export" else [])
    assert run_cli(argv) == 2
    line = one_error_line(capsys)
    assert "no entry" in line or "entry id must be" in line, line
    assert not (tmp_path / "out.safetensors").exists()


def test_entry_ids_in_the_python_api(lib):
    with lorasynth.Library.open(lib) as library:
        first = library.resolve("1")
        assert library.resolve(np.int64(1)).id == library.resolve(1).id == first.id
        with pytest.raises(LibraryError, match="no entry '²'"):
            library.resolve("²")
        for bad in (2**63, -1, True, 1.5, float("nan")):
            with pytest.raises(InputError, match="entry id must be"):
                library.resolve(bad)


# --------------------------------------------------------------------------- blend weights


@pytest.mark.parametrize("weight", HOSTILE_FLOATS)
def test_blend_refuses_non_finite_and_huge_weights(weight):
    lora = sd15_lora(NAMES_TINY)
    with pytest.raises(LorasynthError) as err:
        lorasynth.blend([(lora, 1.0), (lora, weight)])
    assert "\n" not in str(err.value) and ("weight" in str(err.value) or "pairs" in str(err.value))


def test_blend_accepts_ordinary_weights_and_the_result_is_finite():
    lora = sd15_lora(NAMES_TINY)
    out = lorasynth.blend([(lora, 1000.0), (lora, -0.5), (lora, np.float32(0.25)), (lora, 2)])
    assert all(bool(m.up.isfinite().all()) and bool(m.down.isfinite().all()) for m in out.modules.values())
    with pytest.raises(InputError, match="rank must be"):
        lorasynth.blend([(lora, 1.0)], rank=0)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e308", "x", "1e999"])
def test_cli_blend_weights_are_one_line(tmp_path, capsys, weight):
    f = tmp_path / "a.safetensors"
    sd15_lora(NAMES_TINY).save(f)
    assert run_cli(["blend", f"{f}=1", f"{f}={weight}", "-o", tmp_path / "out.safetensors"]) == 2
    assert "weight" in one_error_line(capsys)
    assert not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------- synthesis knobs


@pytest.mark.parametrize("knob, value", [
    ("guidance", float("nan")), ("guidance", float("inf")), ("guidance", -1), ("guidance", 51), ("guidance", [7]),
    ("steps", 10**9), ("steps", 0), ("steps", 2.5), ("seed", -1), ("seed", 2**63), ("seed", float("nan")),
    ("k", 0), ("temperature", float("nan")), ("temperature", 0),
])
def test_synthesizer_refuses_bad_knobs(model_dir, knob, value):
    syn = lorasynth.Synthesizer(model_dir)
    with pytest.raises(InputError) as err:
        syn(embedding=np.ones(128, dtype=np.float32), strategy="diffusion" if knob not in ("k", "temperature") else "blend",
            **{knob: value})
    assert knob in str(err.value) and "\n" not in str(err.value)


def test_a_good_synthesis_records_the_steps_that_ran(model_dir):
    syn = lorasynth.Synthesizer(model_dir)
    lora = syn(embedding=np.ones(128, dtype=np.float32), strategy="diffusion", guidance=2.0, steps=7, seed=3)
    assert lora.metadata["lorasynth.steps"] == "7" and lora.metadata["lorasynth.guidance"] == "2.0"
    assert all(bool(m.up.isfinite().all()) for m in lora.modules.values())


@pytest.mark.parametrize("flag, value", [("--guidance", "-1"), ("--guidance", "51"), ("--steps", "1001"), ("--steps", "0"),
                                         ("--seed", "-1"), ("--seed", "9223372036854775808")])
def test_cli_synthesize_uses_the_servers_rule(model_dir, tmp_path, capsys, flag, value):
    """The CLI and the server both call ``SynthesisSettings.validate``: the same rule, the same words."""
    from lorasynth.synthesis.synthesizer import SynthesisSettings

    np.save(tmp_path / "e.npy", np.ones(128, dtype=np.float32))
    out = tmp_path / "o.safetensors"
    rc = run_cli(["synthesize", "--model", model_dir, "--embedding", tmp_path / "e.npy", "-o", out, flag, value])
    assert rc == 2 and not out.exists()
    line = one_error_line(capsys)
    knob = flag.removeprefix("--")
    with pytest.raises(InputError) as err:
        SynthesisSettings(strategy="diffusion", **{knob: int(value) if knob != "guidance" else float(value)}).validate()
    assert line == f"lorasynth: error: {err.value}"


@pytest.mark.parametrize("flag", ["--guidance", "--temperature"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_cli_non_finite_knobs_are_one_line(model_dir, tmp_path, capsys, flag, value):
    rc = run_cli(["synthesize", "--model", model_dir, "--embedding", tmp_path / "e.npy", "-o", tmp_path / "o.safetensors",
                  f"{flag}={value}"])
    assert rc == 2 and "finite number" in one_error_line(capsys)


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf", "1e999", "x"])
def test_serve_max_upload_mb_is_checked(capsys, value):
    assert run_cli(["serve", "--model", "m", "--max-upload-mb", value]) == 2
    assert "--max-upload-mb" in one_error_line(capsys)


@pytest.mark.parametrize("argv", [["generate", "--base", "b", "--prompt", "p", "--guidance", "nan", "-o", "x.png"],
                                  ["library", "list", "lib", "--limit", "²"],
                                  ["train", "latent", "--pack", "p", "--out", "o", "--lr", "nan"],
                                  ["train", "latent", "--pack", "p", "--out", "o", "--devices", "²"],
                                  ["blend", "a=1", "-o", "x", "--rank", "99999999999999999999999"]])
def test_other_commands_refuse_odd_numbers_in_one_line(capsys, argv):
    assert run_cli(argv) == 2
    one_error_line(capsys)


# --------------------------------------------------------------------------- ComfyUI nodes


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e308])
def test_comfyui_blend_and_apply_refuse_non_finite_numbers(value):
    from lorasynth.apps.comfyui.nodes import ApplyLoRA, BlendLoRAs

    lora = sd15_lora(NAMES_TINY)
    with pytest.raises(InputError, match="weight_2"):
        BlendLoRAs().blend(lora, 1.0, 0, lora_2=lora, weight_2=value)
    with pytest.raises(InputError, match="rank"):
        BlendLoRAs().blend(lora, 1.0, value)
    with pytest.raises(InputError, match="strength_model"):
        ApplyLoRA().apply(None, None, lora, value, 1.0)  # refused before ComfyUI's patcher is touched
    with pytest.raises(InputError, match="strength_clip"):
        ApplyLoRA().apply(None, None, lora, 1.0, value)


@pytest.mark.parametrize("knob", ["guidance", "seed", "face_index"])
def test_comfyui_synthesize_node_refuses_nan(knob):
    from lorasynth.apps.comfyui.engine import SynthesisEngine
    from lorasynth.apps.comfyui.nodes import SynthesizeLoRAFromFace

    engine = SynthesisEngine.__new__(SynthesisEngine)  # the numbers are checked before the model is used
    kwargs = {"face_index": 0, "strategy": "diffusion", "guidance": 0.0, "seed": 0, knob: float("nan")}
    with pytest.raises(InputError, match=knob):
        SynthesizeLoRAFromFace().synthesize(engine, None, **kwargs)


def test_comfyui_model_list_ends_on_a_symlink_loop(tmp_path, monkeypatch):
    """Issue 20 #10: ``os.walk(followlinks=True)`` never returned on a link loop under models/lorasynth."""
    from lorasynth.apps.comfyui import nodes

    root = tmp_path / "models" / "lorasynth"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "loop").symlink_to(root / "a", target_is_directory=True)  # a -> b -> loop -> a ...
    (root / "self").symlink_to(root, target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    (root / "m1").mkdir()
    (root / "m1" / "lorasynth_model.json").write_text("{}")
    (root / "deep" / "x").mkdir(parents=True)
    (root / "deep" / "x" / "lorasynth_model.json").write_text("{}")
    (root / "linked").symlink_to(root / "m1", target_is_directory=True)  # a linked model folder: listed once
    fake = types.ModuleType("folder_paths")
    fake.models_dir = str(tmp_path / "models")
    fake.folder_names_and_paths = {}
    fake.get_folder_paths = lambda name: list(fake.folder_names_and_paths[name][0])
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    box = {}
    t = threading.Thread(target=lambda: box.update(names=nodes.synthesis_model_names()), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the model list hangs on a symlink loop"
    assert box["names"] == ["deep/x", "m1"]  # `linked` is m1 again: each real folder once


def test_comfyui_model_walk_is_bounded(tmp_path):
    from lorasynth.apps.comfyui.nodes import bounded_model_walk

    deep = tmp_path
    for i in range(12):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "lorasynth_model.json").write_text("{}")
    assert bounded_model_walk(str(tmp_path), max_depth=8) == set()
    assert bounded_model_walk(str(tmp_path), max_depth=20) == {"/".join(f"d{i}" for i in range(12))}
    for i in range(30):
        (tmp_path / f"w{i:02d}").mkdir()
    assert bounded_model_walk(str(tmp_path), max_folders=5) == set()  # stops after 5 folders
