"""Synthesis end to end on a small planted world and the tiny pipeline (mechanics, not quality)."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import build_tiny_model
from lorasynth.errors import LorasynthError, ModelError
from lorasynth.formats import ModuleTree, load_lora
from lorasynth.synthesis.synthesizer import SynthesisSettings, Synthesizer, write_synthesized


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("synth"), 300, seed=0, latent_dim=16, steps=(60, 80))


@pytest.fixture(scope="module")
def astronaut_jpg(tmp_path_factory):
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(path)
    return path


def test_every_strategy_writes_a_loadable_kohya_lora(model_dir, tmp_path):
    syn = Synthesizer(model_dir)
    e = syn.pack.read_embeddings([int(syn.model.info.heldout_ids[0])])[0]
    for strategy in ("diffusion", "blend", "nearest", "sample"):
        result = syn.synthesize(None if strategy == "sample" else e, SynthesisSettings(strategy=strategy, seed=3))[0]
        path = write_synthesized(result, tmp_path / f"{strategy}.safetensors")
        back = load_lora(path, tree=ModuleTree.from_specs(syn.layout.modules))
        assert back.metadata["lorasynth.strategy"] == strategy
        assert back.metadata["lorasynth.model_hash"] == syn.model_hash
        assert back.metadata["ss_network_module"] == "networks.lora"
        assert back.metadata["modelspec.trigger_phrase"] == "sks person"
        assert set(back.modules) == set(syn.layout.names)
        assert all(torch.isfinite(m.delta()).all() for m in back.modules.values())
    k = syn.model_defaults()["blend"]["k"]  # the blend's k: the model's, chosen on validation people
    assert k in (1, 2, 4, 8, 16, 32, 64)
    blended = load_lora(tmp_path / "blend.safetensors", tree=ModuleTree.from_specs(syn.layout.modules))
    assert blended.modules[syn.layout.names[0]].rank == k  # exact top-k blend (rank-1 LoRAs concatenate)
    assert json.loads(blended.metadata["lorasynth.neighbours"])["ids"].__len__() == k
    explicit = syn.synthesize(e, SynthesisSettings(strategy="blend", k=2, temperature=0.1))[0]
    assert len(json.loads(explicit.provenance["lorasynth.neighbours"])["ids"]) == 2  # the caller's k wins


def test_nearest_returns_the_library_entry_with_the_closest_embedding(model_dir):
    syn = Synthesizer(model_dir)
    row = int(syn.model.info.train_ids[5])
    e = syn.pack.read_embeddings([row])[0]
    result = syn.synthesize(e, SynthesisSettings(strategy="nearest"))[0]
    assert json.loads(result.provenance["lorasynth.neighbours"])["ids"] == [syn.pack.ids[row]]
    assert np.allclose(result.vector, syn.pack.read_rows([row])[0])


def test_same_seed_same_file_and_different_seed_differs(model_dir, tmp_path):
    syn = Synthesizer(model_dir)
    e = syn.pack.read_embeddings([0])[0]
    paths = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        paths.append(write_synthesized(syn.synthesize(e, SynthesisSettings(seed=seed))[0], tmp_path / name / "lora.safetensors"))
    again = Synthesizer(model_dir)  # a fresh process-like load gives the same bytes too
    paths.append(write_synthesized(again.synthesize(e, SynthesisSettings(seed=1))[0], tmp_path / "d" / "lora.safetensors"))
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] == data[3] and data[0] != data[2]


def test_astronaut_photo_lora_changes_the_tiny_pipeline_output(model_dir, astronaut_jpg, tiny_pipeline, tmp_path):
    from lorasynth.runtime.apply import fused, pipeline_tree
    from lorasynth.runtime.pipeline import GenerationSettings, generate

    syn = Synthesizer(model_dir)
    e, selection = syn.embed_photo(astronaut_jpg)
    assert selection.n_faces == 1 and e.shape == (128,)
    path = write_synthesized(syn.synthesize(e, SynthesisSettings(seed=0))[0], tmp_path / "astro.safetensors")
    lora = load_lora(path, tree=pipeline_tree(tiny_pipeline))
    s = GenerationSettings(prompt="a photo of sks person", steps=2, width=64, height=64, seed=0)
    base = np.asarray(generate(tiny_pipeline, s, progress=False), dtype=float)
    with fused(tiny_pipeline, [(lora, 1.0)]):
        changed = np.asarray(generate(tiny_pipeline, s, progress=False), dtype=float)
    assert (changed != base).mean() > 0.05  # a visible share of pixel values moved
    # and diffusers itself loads the file
    tiny_pipeline.load_lora_weights(str(tmp_path), weight_name="astro.safetensors", adapter_name="astro")
    assert "astro" in tiny_pipeline.get_active_adapters()


def test_evaluation_reports_every_strategy_and_baselines(model_dir, tmp_path):
    from lorasynth.synthesis.evaluation import evaluate, save_report

    syn = Synthesizer(model_dir)
    results = evaluate(syn)
    assert set(results["strategies"]) == {"mean_lora", "nearest", "blend", "blend_tuned", "regression", "diffusion",
                                          "diffusion_mean", "diffusion_expected"}
    for r in results["strategies"].values():
        assert -1 <= r["delta_cosine_mean"] <= 1 and r["n"] == len(syn.model.info.heldout_ids)
    assert 0 < results["latent"]["reconstruction_delta_cosine"] <= 1
    assert "pca_reconstruction_delta_cosine" in results["latent"]
    j, png = save_report(results, tmp_path)
    assert json.loads(j.read_text())["heldout"] == 30 and png.stat().st_size > 1000


def test_blend_cosine_in_eval_matches_materialized_blend(model_dir):
    """The Gram-matrix shortcut in evaluate equals the cosine of the actually blended LoRA."""
    from lorasynth.synthesis.evaluation import evaluate

    syn = Synthesizer(model_dir)
    row = int(syn.model.info.heldout_ids[0])
    results = evaluate(syn, strategies=("blend",), max_items=1)
    e = syn.pack.read_embeddings([row])[0]
    blended = syn.synthesize(e, SynthesisSettings(strategy="blend"))[0].lora
    truth = syn.layout.unflatten(torch.from_numpy(syn.pack.read_rows([row])[0]))
    a = torch.cat([blended.modules[n].delta(torch.float64).flatten() for n in syn.layout.names])
    b = torch.cat([truth.modules[n].delta(torch.float64).flatten() for n in syn.layout.names])
    cos = (a @ b / (a.norm() * b.norm())).item()
    assert results["strategies"]["blend"]["delta_cosine_mean"] == pytest.approx(cos, abs=1e-6)


def test_bad_inputs(model_dir, tmp_path):
    syn = Synthesizer(model_dir)
    with pytest.raises(LorasynthError, match="embedding has 3 dims"):
        syn.synthesize(np.ones(3), SynthesisSettings())
    with pytest.raises(LorasynthError, match="unknown strategy"):
        syn.synthesize(np.ones(128), SynthesisSettings(strategy="magic"))
    with pytest.raises(LorasynthError, match="whatever.jpg"):
        syn.embed_photo(tmp_path / "whatever.jpg")
    with pytest.raises(ModelError, match="not a lorasynth model folder"):
        Synthesizer(tmp_path)


def test_cli_synthesize_skips_the_exit_garbage_collection(model_dir, tmp_path):
    """A synthesize process freezes the GC at exit (Python's final collection over torch's objects
    costs ~0.35 s); the file is written and the exit handlers still run."""
    import subprocess
    import sys

    np.save(tmp_path / "e.npy", Synthesizer(model_dir).pack.read_embeddings([0])[0])
    out = tmp_path / "s.safetensors"
    code = ("import atexit, gc, sys\n"
            "from lorasynth.apps.cli.main import main\n"
            f"assert main(['synthesize', '--embedding', {str(tmp_path / 'e.npy')!r}, '--model', {str(model_dir)!r},"
            f" '-o', {str(out)!r}]) == 0\n"
            "before = gc.get_freeze_count()\n"
            "atexit._run_exitfuncs()\n"
            "print(before, gc.get_freeze_count())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert res.returncode == 0, res.stderr[-2000:]
    before, after = map(int, res.stdout.split()[-2:])
    assert before == 0 and after > 10_000 and out.stat().st_size > 0


def test_cli_synthesize_sample_interpolate(model_dir, tmp_path):
    from lorasynth.apps.cli.main import main

    e = Synthesizer(model_dir).pack.read_embeddings([0])[0]
    np.save(tmp_path / "e.npy", e)
    threads = torch.get_num_threads()
    old_umask = os.umask(0o022)
    try:
        assert main(["synthesize", "--embedding", str(tmp_path / "e.npy"), "--model", str(model_dir),
                     "--samples", "2", "--threads", "1", "-o", str(tmp_path / "s.safetensors")]) == 0
    finally:
        os.umask(old_umask)
    assert torch.get_num_threads() == threads  # --threads applies to the command only
    assert (tmp_path / "s_0.safetensors").exists() and (tmp_path / "s_1.safetensors").exists()
    # a file others can read (0644 under umask 022, not mkstemp's 0600) that says how to trigger it
    assert stat.S_IMODE((tmp_path / "s_0.safetensors").stat().st_mode) == 0o644
    tree = ModuleTree.from_specs(Synthesizer(model_dir).layout.modules)
    assert load_lora(tmp_path / "s_0.safetensors", tree=tree).metadata["modelspec.trigger_phrase"] == "sks person"
    assert main(["sample", "--model", str(model_dir), "-n", "2", "-o", str(tmp_path / "new")]) == 0
    assert len(list((tmp_path / "new").glob("*.safetensors"))) == 2
    assert main(["interpolate", str(tmp_path / "s_0.safetensors"), str(tmp_path / "s_1.safetensors"),
                 "--model", str(model_dir), "-o", str(tmp_path / "mid.safetensors")]) == 0
    layout = Synthesizer(model_dir).layout
    assert load_lora(tmp_path / "mid.safetensors", tree=ModuleTree.from_specs(layout.modules)).metadata["lorasynth.interpolate"]
    assert main(["synthesize", "--embedding", str(tmp_path / "missing.npy"), "--model", str(model_dir), "-o",
                 str(tmp_path / "x.safetensors")]) == 2


def test_default_strategy_rule_never_keeps_a_sample_below_the_simple_baselines():
    from lorasynth.training.strategy_choice import pick_default

    good = {"diffusion": 0.60, "average": 0.75, "nearest": 0.55, "blend": 0.70}
    assert pick_default(good) == ("diffusion", [])  # samples stay the default while they hold up
    strategy, notes = pick_default({**good, "diffusion": 0.44, "nearest": 0.58}, "k=32 τ=0.1", 200)
    assert strategy == "average" and len(notes) == 2 and "below nearest" in notes[0] and "200" in notes[0]
    strategy, notes = pick_default({**good, "average": 0.69, "blend": 0.73})
    assert strategy == "blend" and "below the blend" in notes[0]
    assert pick_default({"diffusion": 0.3, "average": 0.35, "nearest": 0.5, "blend": 0.45})[0] == "nearest"


def test_auto_strategy_follows_the_model_defaults_and_old_models_still_sample(model_dir, tmp_path):
    """`synthesize` without --strategy uses the model's default (hypernet.json `defaults`, chosen on
    validation people); a model folder without it keeps the old default (one diffusion sample)."""
    import shutil

    from lorasynth.models.model_folder import SynthesisModel

    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst, ignore=shutil.ignore_patterns("train"))
    meta_path = dst / "hypernet" / "hypernet.json"
    meta = json.loads(meta_path.read_text())
    assert meta["defaults"]["strategy"] in ("diffusion", "average", "blend", "nearest")  # train hypernet wrote it
    assert set(meta["defaults"]["validation"]) == {"diffusion", "average", "nearest", "blend"}

    def with_defaults(defaults):
        m = dict(meta)
        if defaults is None:
            m.pop("defaults")
        else:
            m["defaults"] = defaults
        meta_path.write_text(json.dumps(m))
        SynthesisModel.open(dst).save()  # record the new file hash, as a re-export does
        return Synthesizer(dst)

    e = np.asarray(Synthesizer(model_dir).pack.read_embeddings([0])[0])
    syn = with_defaults({"strategy": "blend", "blend": {"k": 4, "temperature": 0.1}})
    r = syn.synthesize(e)[0]  # SynthesisSettings() default: auto
    assert r.provenance["lorasynth.strategy"] == "blend" and len(json.loads(r.provenance["lorasynth.neighbours"])["ids"]) == 4
    assert syn.synthesize(e, SynthesisSettings(strategy="diffusion"))[0].provenance["lorasynth.strategy"] == "diffusion"
    assert syn.synthesize(e, SynthesisSettings(samples=2))[0].provenance["lorasynth.strategy"] == "diffusion"
    assert syn(embedding=e).metadata["lorasynth.strategy"] == "blend"  # the API's default too
    syn = with_defaults({"strategy": "average", "blend": {"k": 4, "temperature": 0.1}})
    assert syn.synthesize(e)[0].provenance["lorasynth.average_of"] == "expectation"
    syn = with_defaults(None)  # an older model folder
    r = syn.synthesize(e)[0]
    assert r.provenance["lorasynth.strategy"] == "diffusion" and "lorasynth.average_of" not in r.provenance
    r = syn.synthesize(e, SynthesisSettings(strategy="blend"))[0]
    assert len(json.loads(r.provenance["lorasynth.neighbours"])["ids"]) == 8  # the old blend default
    with pytest.raises(ModelError, match="defaults"):
        with_defaults({"strategy": "magic"}).synthesize(e)
