"""The CLI wires the library: one-line errors, exit codes, files written."""

import json

import pytest
import torch

from lorasynth.apps.cli.main import main
from lorasynth.formats import load_lora, save_lora
from lorasynth.runtime.pipeline import read_png_metadata

from helpers import ATTN, random_lora, sd15_lora


@pytest.fixture
def two_loras(tmp_path):
    a = save_lora(sd15_lora([f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_v"], rank=2, seed=1), tmp_path / "a.safetensors")
    b = save_lora(sd15_lora([f"{ATTN}.attn1.to_q"], rank=3, seed=2), tmp_path / "b.safetensors")
    return a, b


def test_inspect_json(two_loras, capsys):
    assert main(["inspect", str(two_loras[0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and info["modules"] == 2 and info["ranks"] == [2]
    assert info["params"] == 2 * (320 + 320) + 2 * (768 + 320)
    assert len(info["module_list"]) == 2 and info["delta_frobenius_norm"] > 0


def test_lora_file_commands_check_against_another_base_with_base(tiny_pipeline_dir, tiny_pipeline, tmp_path, capsys):
    """A LoRA for a model other than SD1.5 (the demo's small base): refused with a hint, read with --base."""
    from lorasynth.runtime.apply import base_tree, pipeline_tree

    tree = base_tree(str(tiny_pipeline_dir))  # built on the meta device from the folder's configs
    assert tree.shapes == pipeline_tree(tiny_pipeline).shapes  # the same modules as the loaded model
    names = sorted(n for n in tree.shapes if n.endswith("attn1.to_q"))[:2]
    f = save_lora(random_lora({n: tree.shapes[n] for n in names}, 2, 2.0, 0), tmp_path / "small.safetensors")
    assert main(["inspect", str(f)]) == 2
    assert "--base MODEL" in capsys.readouterr().err
    assert main(["inspect", str(f), "--base", str(tiny_pipeline_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"] == 2
    assert main(["convert", str(f), str(tmp_path / "d.safetensors"), "--to", "diffusers", "--base", str(tiny_pipeline_dir)]) == 0
    assert main(["blend", f"{f}=0.5", f"{tmp_path / 'd.safetensors'}=0.5", "--base", str(tiny_pipeline_dir),
                 "-o", str(tmp_path / "m.safetensors")]) == 0
    assert main(["inspect", str(f), "--base", str(tmp_path / "nowhere")]) == 2


def test_convert_and_blend(two_loras, tmp_path, capsys):
    a, b = two_loras
    assert main(["convert", str(a), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert load_lora(tmp_path / "d.safetensors").metadata["lorasynth.source_format"] == "diffusers"
    assert main(["blend", f"{a}=0.7", f"{b}=-0.2", "-o", str(tmp_path / "m.safetensors")]) == 0
    m = load_lora(tmp_path / "m.safetensors")
    q = f"{ATTN}.attn1.to_q"
    want = 0.7 * load_lora(a).modules[q].delta() - 0.2 * load_lora(b).modules[q].delta()
    assert torch.allclose(m.modules[q].delta(), want, atol=1e-5) and m.modules[q].rank == 5
    assert main(["blend", f"{a}=0.7", f"{b}=-0.2", "--rank", "1", "-o", str(tmp_path / "r.safetensors")]) == 0
    assert "rank-1 relative error" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["inspect", "/no/such.safetensors"], "no such file"),
    (["blend", "x.safetensors", "-o", "o.safetensors"], "expected FILE=WEIGHT"),
    (["blend", "x.safetensors=abc", "-o", "o.safetensors"], "must be a finite number"),
])
def test_user_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_generate_writes_png_with_settings(tiny_pipeline_dir, tmp_path, capsys):
    from lorasynth.runtime.apply import pipeline_tree
    from lorasynth.core.layout import Layout
    from lorasynth.runtime.pipeline import load_pipeline

    tree = pipeline_tree(load_pipeline(str(tiny_pipeline_dir)))
    layout = Layout.for_targets(tree.shapes, ("attn1.to_q", "attn2.to_v"), 2)
    lora = layout.unflatten(torch.randn(layout.size, generator=torch.Generator().manual_seed(0)) * 0.1)
    path = save_lora(lora, tmp_path / "l.safetensors")
    out = tmp_path / "img.png"
    rc = main(["generate", "--base", str(tiny_pipeline_dir), "--lora", f"{path}=0.8", "--prompt", "a photo of sks person",
               "--steps", "2", "--width", "64", "--height", "64", "--seed", "7", "--scheduler", "euler", "-o", str(out)])
    assert rc == 0 and out.exists()
    assert "random weights" in capsys.readouterr().out
    settings, extra = read_png_metadata(out)
    assert settings.seed == 7 and settings.scheduler == "euler" and settings.width == 64
    assert "l.safetensors" in extra["Lora"]
    assert main(["generate", "--base", str(tiny_pipeline_dir), "--prompt", "x", "--width", "60", "-o",
                 str(tmp_path / "bad.png")]) == 2


@pytest.fixture
def tiny_pack(tmp_path):
    from lorasynth.worlds.planted import SyntheticWorldConfig, make_world, tiny_layout, write_world_pack

    world = make_world(SyntheticWorldConfig(n_identities=40, layout=tiny_layout(), seed=0))
    return write_world_pack(world, tmp_path / "pack")


def test_train_latent_fits_pca_by_default_and_train_vae_is_its_deprecated_name(tiny_pack, tmp_path, capsys):
    """``train latent`` (PCA unless --kind vae); ``train vae`` runs the same command with one warning line."""
    from lorasynth.models.model_folder import SynthesisModel

    common = ["--pack", str(tiny_pack), "--latent-dim", "8", "--no-progress"]
    assert main(["train", "latent", "--out", str(tmp_path / "m1"), *common]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("trained pca (latent 8,") and "deprecated" not in err
    assert SynthesisModel.open(tmp_path / "m1").info.latent_kind == "pca"

    assert main(["train", "vae", "--out", str(tmp_path / "m2"), *common]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("trained pca (latent 8,")  # the same default as `train latent`
    assert err.count("\n") == 1 and "`train vae` is deprecated: use `lorasynth train latent` (same options)" in err
    assert SynthesisModel.open(tmp_path / "m2").info.latent_kind == "pca"
    m1, m2 = (sorted((p.relative_to(tmp_path / m), p.read_bytes()) for p in (tmp_path / m / "latent").rglob("*")
                     if p.is_file()) for m in ("m1", "m2"))
    assert m1 == m2  # same options, same seed: the same latent model

    assert main(["train", "latent", "--kind", "vae", "--out", str(tmp_path / "m3"), *common, "--steps", "2",
                 "--batch-size", "8", "--accelerator", "cpu", "--devices", "1"]) == 0
    assert capsys.readouterr().out.count("trained vae (latent 8,") == 1
    assert SynthesisModel.open(tmp_path / "m3").info.latent_kind == "vae"
