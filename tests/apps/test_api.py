"""The public Python API (``import lorasynth``), the README's Python blocks, and model folders
as hub repositories (save_pretrained / from_pretrained, model card, integrity checks).

One small model is trained once for the whole file (planted world, dlib-sized embeddings).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lorasynth
from helpers import build_tiny_model
from lorasynth.errors import LorasynthError, ModelError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("api_model"), 120, seed=1, latent_dim=8, steps=(20, 20),
                            batch_size=32, hypernet={"width": 32, "depth": 1})


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "me.jpg"
    Image.fromarray(data.astronaut()).save(path)
    return path


def _load_tiny(path, syn) -> lorasynth.LoRA:
    """A file of the tiny layout (its modules are not SD1.5-sized): names resolved against the layout."""
    from lorasynth.formats import ModuleTree, load_lora

    return load_lora(path, tree=ModuleTree.from_specs(syn.layout.modules))


def _copy_model(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("train"))
    return dest


# ------------------------------------------------------------------------ import / help


def test_import_is_cheap_and_help_shows_the_api():
    code = "import sys, lorasynth; print(sorted(m for m in ('torch', 'numpy', 'lightning', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"
    assert {"load_lora", "LoRA", "blend", "fused", "Synthesizer", "SynthesisModel", "Library"} <= set(dir(lorasynth))
    import importlib

    for module in ("apps.api", "core.blending", "synthesis", "runtime.apply", "library"):  # a submodule must not shadow a public name
        importlib.import_module(f"lorasynth.{module}")
    assert lorasynth.Synthesizer.__module__ == "lorasynth.synthesis.synthesizer" and lorasynth.blend.__module__ == "lorasynth.apps.api"
    import pydoc

    text = pydoc.render_doc(lorasynth, renderer=pydoc.plaintext)
    for name in ("class Synthesizer", "class LoRA(", "blend(items", "load_lora(path", "fused(pipe", "class Library"):
        assert name in text
    with pytest.raises(AttributeError):
        lorasynth.no_such_name


#: Modules the photo -> LoRA file path must not import: training/pipeline stacks, and what runs
#: under them (sympy, torch._dynamo: 1-2 s of torch's lazily imported compiler, e.g. pulled in by
#: building modules inside a ``torch.device("meta")`` context).
NOT_ON_THE_SYNTHESIS_PATH = ("lightning", "pytorch_lightning", "diffusers", "transformers", "peft", "sympy",
                             "torch._dynamo", "scipy", "skimage", "matplotlib", "insightface", "onnxruntime", "cv2")


@pytest.mark.parametrize("kind", ["vae", "pca"])
def test_synthesis_path_imports_neither_lightning_nor_diffusers(model_dir, photo, tmp_path, kind):
    """Synthesizer.from_pretrained + synthesize from a photo (dlib) + writing the file, in a fresh process."""
    if kind == "pca":  # the same model with a PCA latent of the hypernetwork's size (the default kind)
        from lorasynth.models.latent.pca import fit_pca
        from lorasynth.models.model_folder import SynthesisModel

        model = SynthesisModel.open(_copy_model(model_dir, tmp_path / "pca_model"))
        for f in model.latent_dir.iterdir():
            f.unlink()
        fit_pca(model.open_pack(), 8, idx=np.asarray(model.info.train_ids)).export(model.latent_dir)
        model.info.latent_kind = "pca"
        model.save()
        model_dir = model.path
    out = tmp_path / "me.safetensors"
    code = ("import sys, lorasynth\n"
            f"syn = lorasynth.Synthesizer.from_pretrained({str(model_dir)!r})\n"
            f"syn({str(photo)!r}, seed=0).save({str(out)!r})\n"
            f"print(type(syn.latent).__name__, sorted(m for m in {NOT_ON_THE_SYNTHESIS_PATH!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[0] == {"vae": "VAENet", "pca": "PCA"}[kind]
    assert res.stdout.strip().endswith("[]"), res.stdout
    assert len(_load_tiny(out, lorasynth.Synthesizer.from_pretrained(model_dir))) > 0  # a readable LoRA file


# ------------------------------------------------------------------------ README


def _readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), re.S | re.M)


def test_readme_python_blocks_run(model_dir, photo, tiny_pipeline_dir, tmp_path, monkeypatch):
    """Every ```python block of README.md runs, in order, against the tiny model and pipeline."""
    from lorasynth.faces import get_embedder
    from lorasynth.worlds.planted import tiny_layout

    blocks = _readme_python_blocks()
    assert len(blocks) >= 3
    lorasynth.SynthesisModel.open(model_dir).save_pretrained(tmp_path / "my-model", include_pack=True)
    shutil.copy(photo, tmp_path / "me.jpg")
    np.save(tmp_path / "me.npy", get_embedder("dlib").embed_with_report(photo).face.embedding)
    os.symlink(tiny_pipeline_dir, tmp_path / "sd15")
    layout = tiny_layout(rank=2)
    lorasynth.LoRA.save(layout.unflatten(torch.randn(layout.size, generator=torch.Generator().manual_seed(0)) * 0.1),
                        tmp_path / "style.safetensors")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block in the failure
            raise AssertionError(f"README python block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e
    for name in ("me.safetensors", "me.png"):
        assert (tmp_path / name).stat().st_size > 0, name


# ------------------------------------------------------------------------ LoRA / blend / Synthesizer


def test_synthesizer_call_returns_a_lora_with_provenance(model_dir, photo, tmp_path):
    syn = lorasynth.Synthesizer.from_pretrained(str(model_dir))
    lora = syn(str(photo), seed=3)
    assert isinstance(lora, lorasynth.LoRA) and set(lora.modules) == set(syn.layout.names)
    meta = lora.metadata
    assert meta["lorasynth.strategy"] == "diffusion" and meta["lorasynth.seed"] == "3"
    assert meta["lorasynth.source"] == "me.jpg" and meta["lorasynth.model_hash"] == syn.model_hash
    assert meta["modelspec.trigger_phrase"] == "sks person"
    e, _ = syn.embed_photo(photo)
    same = syn(embedding=e, seed=3)
    assert all(torch.equal(same.modules[n].up, lora.modules[n].up) for n in lora.modules)
    blended = syn(embedding=e, strategy="blend", k=4)
    assert blended.metadata["lorasynth.strategy"] == "blend" and len(json.loads(blended.metadata["lorasynth.neighbours"])["ids"]) == 4
    assert syn(strategy="sample", seed=1).metadata["lorasynth.guidance"] == "unconditional"
    with pytest.raises(LorasynthError, match="not both"):
        syn(str(photo), embedding=e)
    with pytest.raises(LorasynthError, match="needs a face photo or embedding"):
        syn(strategy="nearest")
    path = lora.save(tmp_path / "me.safetensors")
    back = _load_tiny(path, syn)
    assert back.metadata["lorasynth.strategy"] == "diffusion"
    assert max((back.modules[n].delta() - lora.modules[n].delta()).abs().max().item() for n in lora.modules) < 1e-6
    from lorasynth.apps.cli.main import main  # the CLI (face embedder built in a background thread) writes the same LoRA

    assert main(["synthesize", "--face", str(photo), "--model", str(model_dir), "--seed", "3",
                 "-o", str(tmp_path / "cli.safetensors")]) == 0
    cli = _load_tiny(tmp_path / "cli.safetensors", syn)
    assert all(torch.equal(cli.modules[n].up, back.modules[n].up) for n in lora.modules)


def test_blend_takes_pairs_of_loras_or_paths(tmp_path):
    from helpers import ATTN, sd15_lora

    a = sd15_lora([f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_v"], rank=2, alpha=3.0, seed=1)
    b = sd15_lora([f"{ATTN}.attn1.to_q"], rank=3, seed=2)
    b_path = b.save(tmp_path / "b.safetensors")
    mix = lorasynth.blend([(a, 0.7), (b_path, -0.2)])
    q = f"{ATTN}.attn1.to_q"
    assert torch.allclose(mix.modules[q].delta(), 0.7 * a.modules[q].delta() - 0.2 * b.modules[q].delta(), atol=1e-5)
    assert json.loads(mix.metadata["lorasynth.blend"])["sources"][1] == "b.safetensors"
    small = lorasynth.blend([(a, 0.7), (b, -0.2)], rank=1)
    assert small.ranks == {1} and 0 < json.loads(small.metadata["lorasynth.blend"])["overall_relative_error"] < 1
    with pytest.raises(LorasynthError, match="pairs"):
        lorasynth.blend([a, b])


def test_to_diffusers_state_dict_loads_into_diffusers_exactly(tiny_pipeline):
    """diffusers' load_lora_weights + fuse_lora on to_diffusers() == lorasynth's own fuse, per module."""
    from lorasynth.runtime.apply import fused
    from lorasynth.worlds.planted import tiny_layout

    names = tiny_layout().names[:4]
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    shapes = {n: (32, 32) for n in names} | {te: (32, 32)}
    from helpers import random_lora

    lora = random_lora(shapes, rank=2, alpha=5.0, seed=4)  # alpha != rank: the scale must survive
    with fused(tiny_pipeline, [(lora, 1.0)]):
        want = {n: _weight(tiny_pipeline, n).clone() for n in shapes}
    tiny_pipeline.load_lora_weights(lora.to_diffusers(), adapter_name="me")
    tiny_pipeline.fuse_lora(lora_scale=1.0)
    for n in shapes:
        assert torch.allclose(_weight(tiny_pipeline, n), want[n], atol=1e-5), n


def _weight(pipe, name: str) -> torch.Tensor:
    from lorasynth.core.sd15 import get_layer

    component, path = name.split(".", 1)
    layer = get_layer(getattr(pipe, component), component, path)
    return getattr(layer, "base_layer", layer).weight.detach()


# ------------------------------------------------------------------------ model folders


def test_save_pretrained_writes_a_hub_repo_with_a_model_card(model_dir, tmp_path):
    from huggingface_hub import ModelCard

    from lorasynth.models.model_card import read_model_card
    from lorasynth.models.model_folder import SynthesisModel

    (model_dir / "eval").mkdir(exist_ok=True)
    (model_dir / "eval" / "eval.json").write_text(json.dumps(
        {"strategies": {"diffusion": {"delta_cosine_mean": 0.91, "relative_error_mean": 0.4, "n": 12}},
         "latent": {"kind": "vae", "reconstruction_delta_cosine": 0.97}}))
    out = SynthesisModel.open(model_dir).save_pretrained(tmp_path / "hub", base_model="org/sd15", license="mit")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"README.md", "lorasynth_model.json"} <= set(files)
    assert {f.split("/")[0] for f in files if "/" in f} == {"latent", "hypernet"}  # no train/ checkpoints, no pack
    assert any(f.startswith("hypernet/") and f.endswith(".safetensors") for f in files)
    meta = read_model_card(out)
    info = json.loads((out / "lorasynth_model.json").read_text())
    assert meta["library_name"] == "lorasynth" and meta["base_model"] == "org/sd15" and meta["license"] == "mit"
    assert meta["embedder"] == "dlib" and meta["layout_signature"] == info["layout_signature"]
    assert "lorasynth" in meta["tags"] and info["pack"] == ""  # no local path of the exporter leaks
    card = ModelCard.load(out / "README.md")  # the hub's own parser reads it too
    assert card.data.library_name == "lorasynth"
    assert "| diffusion | 0.9100 |" in card.text and "consent" in card.text
    assert set(info["files"]) == {f for f in files if f.startswith(("latent/", "hypernet/"))}
    syn = lorasynth.Synthesizer.from_pretrained(out)
    assert syn(embedding=np.ones(128), seed=0).metadata["lorasynth.model_hash"] == lorasynth.Synthesizer(model_dir).model_hash
    with pytest.raises(ModelError, match="ships no pack"):
        syn(embedding=np.ones(128), strategy="nearest")
    with pytest.raises(ModelError, match="not an empty folder"):
        SynthesisModel.open(model_dir).save_pretrained(out)
    from lorasynth.apps.cli.main import main

    assert main(["export-model", str(model_dir), str(tmp_path / "cli"), "--include-pack", "--license", "mit"]) == 0
    assert read_model_card(tmp_path / "cli")["license"] == "mit" and (tmp_path / "cli" / "pack").is_dir()
    assert main(["export-model", str(model_dir), str(tmp_path / "cli")]) == 2  # one-line error: not empty


def _hub_cache(model_dir: Path, cache: Path, repo: str = "org/tiny-model") -> Path:
    """A Hugging Face cache laid out by hand: models--org--name/{refs/main, snapshots/<sha>/...}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(sha)
    lorasynth.SynthesisModel.open(model_dir).save_pretrained(entry / "snapshots" / sha)
    return entry / "snapshots" / sha


def test_from_pretrained_reads_a_hub_id_from_the_local_cache_offline(model_dir, tmp_path):
    snapshot = _hub_cache(model_dir, tmp_path / "hf")
    np.save(tmp_path / "e.npy", np.ones(128, dtype=np.float32))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    cmd = [sys.executable, "-m", "lorasynth.apps.cli.main", "synthesize", "--embedding", str(tmp_path / "e.npy"),
           "--model", "org/tiny-model", "-o", str(tmp_path / "out.safetensors")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    syn = lorasynth.Synthesizer(snapshot)
    assert _load_tiny(tmp_path / "out.safetensors", syn).metadata["lorasynth.model_hash"] == syn.model_hash
    code = ("import lorasynth; m = lorasynth.SynthesisModel.from_pretrained('org/tiny-model'); print(m.path); "
            "lorasynth.SynthesisModel.from_pretrained('org/absent-model')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.strip() == str(snapshot)
    assert run.stderr.strip().splitlines()[-1].startswith("lorasynth.errors.ModelError: org/absent-model is not a local folder")


@pytest.mark.parametrize("damage, message", [
    ("not_utf8", "not UTF-8"),
    ("string_layout", "field 'layout' has an invalid value"),
    ("bad_json", "not valid JSON"),
    ("deep", "levels deep"),
    ("duplicate_key", "duplicate"),
    ("list", "expected a JSON object"),
    ("escaping_file", "not a plain path"),
])
def test_corrupt_model_json_is_one_model_error(model_dir, tmp_path, damage, message):
    folder = _copy_model(model_dir, tmp_path / "m")
    f = folder / "lorasynth_model.json"
    info = json.loads(f.read_text())
    data = {
        "not_utf8": b"\xff\xfe" + f.read_bytes(),
        "string_layout": json.dumps({**info, "layout": "w2w"}).encode(),
        "bad_json": b'{"layout": ',
        "deep": b"[" * 100000,
        "duplicate_key": b'{"embed_dim": 128, "embed_dim": 128}',
        "list": b"[1, 2]",
        "escaping_file": json.dumps({**info, "files": {"../../etc/passwd": "0" * 64}}).encode(),
    }[damage]
    f.write_bytes(data)
    with pytest.raises(ModelError, match=re.escape(message)):
        lorasynth.Synthesizer(folder)


def test_weight_files_are_verified_on_load(model_dir, tmp_path):
    folder = _copy_model(model_dir, tmp_path / "m")
    info = json.loads((folder / "lorasynth_model.json").read_text())
    assert len(info["files"]) >= 4 and all(len(h) == 64 for h in info["files"].values())
    weights = folder / "hypernet" / "hypernet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    syn = lorasynth.Synthesizer(folder)
    with pytest.raises(ModelError, match="does not match the SHA-256 recorded at export"):
        syn(embedding=np.ones(128))
    (folder / "latent" / "vae.safetensors").unlink()
    with pytest.raises(ModelError, match="is missing latent/vae.safetensors"):
        lorasynth.Synthesizer(folder).latent


def test_loader_failures_are_one_model_error(model_dir, tmp_path):
    """Folders without recorded hashes (older exports) or with a wrong config still fail in one line."""
    from lorasynth.models.model_folder import SynthesisModel

    folder = _copy_model(model_dir, tmp_path / "m")
    vae_json = folder / "latent" / "vae.json"
    cfg = json.loads(vae_json.read_text())
    cfg_text = json.dumps(cfg)
    wrong = re.sub(r'"latent_dim": \d+', '"latent_dim": 5', cfg_text)
    assert wrong != cfg_text
    vae_json.write_text(wrong)
    SynthesisModel.open(folder).save()  # re-record the hashes: the file is "valid" but does not fit its weights
    with pytest.raises(ModelError, match=r"latent") as err:
        lorasynth.Synthesizer(folder).latent
    assert "\n" not in str(err.value) and "size mismatch" in str(err.value)
    vae_json.write_text(cfg_text)
    (folder / "latent" / "vae.safetensors").unlink()
    raw = json.loads((folder / "lorasynth_model.json").read_text())
    (folder / "lorasynth_model.json").write_text(json.dumps({**raw, "files": {}}))  # an export without hashes
    with pytest.raises(ModelError, match="latent") as err:
        lorasynth.Synthesizer(folder).latent
    assert "\n" not in str(err.value)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        lorasynth.Synthesizer.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="not a lorasynth model folder"):
        lorasynth.Synthesizer.from_pretrained(tmp_path)
