"""Issue 20: a model folder is untrusted input: links, file kinds, hub refs, and every config field.

* ``export-model`` copies only the files ``lorasynth_model.json`` lists, as regular files: a
  ``latent/notes.json -> secret`` link or a ``pack/cache -> ~/.ssh``-like folder never reaches
  the shareable copy;
* a hub cache whose ``refs/main`` holds ``../..`` or an absolute path is refused;
* model files that are FIFOs, ``/dev/zero`` links, folders or unreadable are one ModelError line,
  never a hang or an unbounded read; the hash is checked on the bytes that are then parsed;
* ``vae.json`` / ``hypernet.json`` / ``pca.json`` fields are type- and range-checked (one line).

The model is built without training (a PCA latent and an untrained hypernetwork): seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lorasynth.apps.cli.main import main
from lorasynth.errors import ModelError

from helpers import build_untrained_model, make_kind, within

COND = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small untrained model folder (PCA latent + hypernetwork) and its pack."""
    return build_untrained_model(tmp_path_factory.mktemp("modelfiles"), cond_dim=COND)


def copy_model(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


def cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lorasynth: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- export-model and links


def test_export_model_copies_the_listed_regular_files(model_dir, tmp_path, capsys):
    rc, err = cli(["export-model", model_dir, tmp_path / "share", "--include-pack"], capsys)
    assert rc == 0, err
    files = sorted(str(p.relative_to(tmp_path / "share")) for p in (tmp_path / "share").rglob("*") if p.is_file())
    listed = sorted(json.loads((model_dir / "lorasynth_model.json").read_text())["files"])
    assert files == sorted(listed + ["README.md", "lorasynth_model.json", "pack/embeddings.npy", "pack/pack.json",
                                     "pack/stats.safetensors", "pack/vectors.npy"])
    assert not any(p.is_symlink() for p in (tmp_path / "share").rglob("*"))


def test_a_linked_file_in_the_model_folder_is_refused_and_never_copied(model_dir, tmp_path, capsys):
    """Issue 20 #1: ``latent/notes.json -> ~/secret.txt`` put the secret into the shareable copy."""
    from lorasynth.models.model_folder import SynthesisModel

    secret = tmp_path / "secret.txt"
    secret.write_text('{"password": "hunter2"}')
    folder = copy_model(model_dir, tmp_path / "m")
    (folder / "latent" / "notes.json").symlink_to(secret)
    SynthesisModel.open(folder).save()  # a save never records a link
    assert "latent/notes.json" not in json.loads((folder / "lorasynth_model.json").read_text())["files"]
    rc, err = cli(["export-model", folder, tmp_path / "share"], capsys)
    assert rc == 0, err
    assert not (tmp_path / "share" / "latent" / "notes.json").exists()
    assert all("hunter2" not in p.read_text(errors="replace") for p in (tmp_path / "share").rglob("*") if p.is_file())
    # a folder saved while the link was recorded (an older lorasynth, or a crafted json): refused, one line
    info = json.loads((folder / "lorasynth_model.json").read_text())
    info["files"]["latent/notes.json"] = "0" * 64
    (folder / "lorasynth_model.json").write_text(json.dumps(info))
    rc, err = cli(["export-model", folder, tmp_path / "share2"], capsys)
    assert rc == 2 and "symbolic link" in one_line(err)
    assert not (tmp_path / "share2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".share2")]  # no staging folder left


def test_a_linked_weight_file_is_refused(model_dir, tmp_path, capsys):
    folder = copy_model(model_dir, tmp_path / "m")
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / "latent" / "pca.safetensors", real)
    (folder / "latent" / "pca.safetensors").symlink_to(real)
    rc, err = cli(["export-model", folder, tmp_path / "share"], capsys)
    assert rc == 2 and "symbolic link" in one_line(err) and not (tmp_path / "share").exists()


def test_include_pack_copies_the_pack_files_only_never_a_linked_folder(model_dir, tmp_path, capsys):
    """Issue 20 #1: with ``--include-pack``, ``pack/cache -> ~/.ssh`` was copied whole, private key included."""
    from lorasynth.models.model_folder import SynthesisModel

    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    pack = tmp_path / "pack"
    shutil.copytree(model_dir.parent / "pack", pack)
    (pack / "cache").symlink_to(ssh, target_is_directory=True)
    folder = copy_model(model_dir, tmp_path / "m")
    model = SynthesisModel.open(folder)
    model.info.pack = str(pack)
    model.save()
    rc, err = cli(["export-model", folder, tmp_path / "share", "--include-pack"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "share" / "pack").iterdir()) == [
        "embeddings.npy", "pack.json", "stats.safetensors", "vectors.npy"]
    assert not any("PRIVATE KEY" in p.read_text(errors="replace") for p in (tmp_path / "share").rglob("*") if p.is_file())
    # a pack file that is itself a link: refused in one line, nothing written
    (pack / "pack.json").rename(pack / "real.json")
    (pack / "pack.json").symlink_to(pack / "real.json")
    rc, err = cli(["export-model", folder, tmp_path / "share2", "--include-pack"], capsys)
    assert rc == 2 and "symbolic link" in one_line(err) and not (tmp_path / "share2").exists()


def test_a_listed_file_outside_the_parts_is_refused(model_dir, tmp_path, capsys):
    folder = copy_model(model_dir, tmp_path / "m")
    (folder / "train").mkdir(exist_ok=True)
    (folder / "train" / "x.json").write_text("{}")
    info = json.loads((folder / "lorasynth_model.json").read_text())
    info["files"]["train/x.json"] = "0" * 64
    (folder / "lorasynth_model.json").write_text(json.dumps(info))
    rc, err = cli(["export-model", folder, tmp_path / "share"], capsys)
    assert rc == 2 and "outside latent and hypernet" in one_line(err)


# --------------------------------------------------------------------------- file kinds of model parts


KINDS = ["fifo", "dev-zero", "folder", "loop"]
FILES = ["latent/pca.safetensors", "latent/pca.json", "hypernet/hypernet.safetensors", "hypernet/hypernet.json",
         "lorasynth_model.json"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rel", FILES)
def test_model_files_of_every_kind_are_one_line(model_dir, tmp_path, capsys, kind, rel):
    """Issue 20 #6: a FIFO hung ``synthesize``, a ``/dev/zero`` link read without bound."""
    folder = copy_model(model_dir, tmp_path / "m")
    make_kind(folder / rel, kind)
    np.save(tmp_path / "e.npy", np.ones(COND, dtype=np.float32))
    out = tmp_path / "out.safetensors"
    for argv in (["synthesize", "--model", folder, "--embedding", tmp_path / "e.npy", "-o", out, "--strategy", "diffusion"],
                 ["export-model", folder, tmp_path / "share"]):
        rc, err = within(60, lambda: cli(argv, capsys))
        assert rc == 2, err
        line = one_line(err)
        assert any(w in line for w in ("FIFO", "device", "directory", "link", "not a lorasynth model")), line
        assert not out.exists() and not (tmp_path / "share").exists()


def test_unreadable_model_file_is_one_line(model_dir, tmp_path, monkeypatch):
    from lorasynth.models.model_folder import SynthesisModel

    folder = copy_model(model_dir, tmp_path / "m")
    target = folder / "hypernet" / "hypernet.safetensors"
    real_open = os.open

    def denied(p, *a, **k):
        if str(p) == str(target):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ModelError, match="permission denied") as err:
        SynthesisModel.open(folder).load_hypernet()
    assert "\n" not in str(err.value)


def test_the_hash_is_checked_on_the_bytes_that_are_parsed(model_dir, tmp_path, monkeypatch):
    """Swapping a weight file between the hash check and the parse cannot work: there is one read."""
    from lorasynth.models import model_folder
    from lorasynth.models.model_folder import SynthesisModel

    folder = copy_model(model_dir, tmp_path / "m")
    weights = folder / "hypernet" / "hypernet.safetensors"
    good = weights.read_bytes()
    evil = bytearray(good)
    evil[-5] ^= 0xFF
    reads: list[str] = []
    real = model_folder.read_input_bytes

    def read_then_swap(path, *a, **k):
        data = real(path, *a, **k)
        reads.append(Path(path).name)
        if Path(path) == weights:
            weights.write_bytes(bytes(evil))  # an attacker swaps the file right after the read
        return data

    monkeypatch.setattr(model_folder, "read_input_bytes", read_then_swap)
    model = SynthesisModel.open(folder)
    model.load_hypernet()  # parses the bytes it hashed: the intact ones
    assert reads.count("hypernet.safetensors") == 1
    with pytest.raises(ModelError, match="does not match the SHA-256 recorded at export"):
        SynthesisModel.open(folder).load_hypernet()  # the swapped file is caught on its own read


def test_background_read_is_the_one_that_is_parsed(model_dir, tmp_path):
    from lorasynth.models.model_folder import SynthesisModel

    folder = copy_model(model_dir, tmp_path / "m")
    model = SynthesisModel.open(folder)
    model.start_verify()
    model._hashing.join()
    weights = folder / "hypernet" / "hypernet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))  # changed after the background read: the checked bytes are used
    model.load_hypernet()
    model = SynthesisModel.open(folder)
    model.start_verify()
    with pytest.raises(ModelError, match="does not match the SHA-256"):
        model.load_hypernet()


# --------------------------------------------------------------------------- hub cache refs


def _hub_cache(model_dir: Path, cache: Path, ref: str, repo: str = "org/tiny") -> Path:
    from lorasynth.models.model_folder import SynthesisModel

    sha = "0123456789abcdef0123456789abcdef01234567"
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(ref if ref != "GOOD" else sha)
    SynthesisModel.open(model_dir).save_pretrained(entry / "snapshots" / sha)
    return entry


@pytest.mark.parametrize("ref", ["GOOD", "../..", "ABSOLUTE", "ABSOLUTE_HASH", "LINKED"])
def test_hub_refs_must_name_a_commit_inside_the_cache(model_dir, tmp_path, monkeypatch, ref):
    """Issue 20 #5: ``refs/main`` holding ``../..`` or an absolute path loaded a model from outside the cache."""
    from lorasynth.models.model_folder import SynthesisModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    outside = copy_model(model_dir, tmp_path / "outside" / "0123456789abcdef0123456789abcdef0123beef")
    value = {"ABSOLUTE": str(tmp_path / "outside"), "ABSOLUTE_HASH": str(outside),
             "LINKED": "fedcba9876543210fedcba9876543210fedcba98"}.get(ref, ref)
    entry = _hub_cache(model_dir, tmp_path / "hf", value)
    if ref == "LINKED":
        (entry / "snapshots" / value).symlink_to(outside, target_is_directory=True)
    if ref == "../..":  # make the escaped folder a model folder, as an attacker would
        copy_model(model_dir, tmp_path / "hf2")
        shutil.copytree(tmp_path / "hf2", entry.parent, dirs_exist_ok=True)
    if ref == "GOOD":
        assert SynthesisModel.from_pretrained("org/tiny", cache_dir=tmp_path / "hf").path.name == \
            "0123456789abcdef0123456789abcdef01234567"
        return
    with pytest.raises(ModelError, match="corrupt") as err:
        SynthesisModel.from_pretrained("org/tiny", cache_dir=tmp_path / "hf")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("revision", ["../../x", "/etc", "main/../../x"])
def test_a_revision_with_dots_or_an_absolute_path_is_refused(tmp_path, revision):
    from lorasynth.models.model_folder import SynthesisModel

    with pytest.raises(ModelError, match="not a branch, tag or commit"):
        SynthesisModel.from_pretrained("org/tiny", revision=revision, cache_dir=tmp_path)


# --------------------------------------------------------------------------- config fields


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


HYPERNET_CASES = {
    "num_steps-abc": lambda m: m["sampling"].update(num_steps="abc"),
    "num_steps-1e9": lambda m: m["sampling"].update(num_steps=10**9),
    "num_steps-0": lambda m: m["sampling"].update(num_steps=0),
    "num_steps-float": lambda m: m["sampling"].update(num_steps=10.5),
    "eta-list": lambda m: m["sampling"].update(eta=[1]),
    "eta-2": lambda m: m["sampling"].update(eta=2),
    "guidance-nan": lambda m: m["sampling"].update(guidance=float("nan")),
    "guidance-neg": lambda m: m["sampling"].update(guidance=-1),
    "scheduler": lambda m: m["sampling"].update(scheduler="euler"),
    "sampling-list": lambda m: m.update(sampling=[1]),
    "width-str": lambda m: m["config"].update(width="64"),
    "width-huge": lambda m: m["config"].update(width=10**6),
    "depth-huge": lambda m: m["config"].update(depth=1000),
    "latent-huge": lambda m: m["config"].update(latent_dim=10**6),
    "mlp_ratio-inf": lambda m: m["config"].update(mlp_ratio=float("inf")),
    "dropout-bool": lambda m: m["config"].update(residual_mean="yes"),
    "config-list": lambda m: m.update(config=[]),
    "version-str": lambda m: m.update(version="2"),
}


@pytest.mark.parametrize("case", sorted(HYPERNET_CASES))
def test_hypernet_config_fields_are_checked(model_dir, tmp_path, case):
    """Issue 20 #8: ``num_steps: "abc"`` / ``eta: [1]`` gave tracebacks; ``num_steps: 10**9`` was recorded in
    provenance though far fewer steps ran. The hash is re-recorded: the file is "valid" but hostile."""
    from lorasynth.models.model_folder import SynthesisModel

    folder = copy_model(model_dir, tmp_path / "m")
    _edit_json(folder / "hypernet" / "hypernet.json", HYPERNET_CASES[case])
    SynthesisModel.open(folder).save()
    with pytest.raises(ModelError) as err:
        SynthesisModel.open(folder).load_hypernet()
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_recorded_steps_never_exceed_what_the_schedule_runs(model_dir, tmp_path):
    from lorasynth.models.model_folder import SynthesisModel

    folder = copy_model(model_dir, tmp_path / "m")
    _edit_json(folder / "hypernet" / "hypernet.json", lambda m: (m["config"].update(num_train_timesteps=50),
                                                                  m["sampling"].update(num_steps=80)))
    SynthesisModel.open(folder).save()
    with pytest.raises(ModelError, match="num_steps must be an integer \\(1..50\\)"):
        SynthesisModel.open(folder).load_hypernet()
    _edit_json(folder / "hypernet" / "hypernet.json", lambda m: m["sampling"].update(num_steps=50))
    SynthesisModel.open(folder).save()
    h = SynthesisModel.open(folder).load_hypernet()
    assert h.sampling_defaults["num_steps"] == len(h.timesteps(50)) == 50


LATENT_CASES = {
    "dim-str": lambda m: m.update(dim="12"),
    "dim-neg": lambda m: m.update(dim=-1),
    "latent-float": lambda m: m.update(latent_dim=6.5),
    "latent-huge": lambda m: m.update(latent_dim=2**40),
    "variance-nan": lambda m: m.update(total_variance=float("nan")),
    "signature-int": lambda m: m.update(layout_signature=5),
    "format": lambda m: m.update(format="lorasynth-vae"),
}


@pytest.mark.parametrize("case", sorted(LATENT_CASES))
def test_pca_config_fields_are_checked(model_dir, tmp_path, case):
    from lorasynth.models.model_folder import SynthesisModel

    folder = copy_model(model_dir, tmp_path / "m")
    _edit_json(folder / "latent" / "pca.json", LATENT_CASES[case])
    SynthesisModel.open(folder).save()
    with pytest.raises(ModelError) as err:
        SynthesisModel.open(folder).load_latent()
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from lorasynth.models.latent.vae import VAEConfig, VAENet

    out = tmp_path_factory.mktemp("vae")
    VAENet(VAEConfig(arch="chunked", latent_dim=4, n_tokens=4, min_chunk=8, chunk_rank=4, token_dim=4, d_model=8,
                     n_heads=2), 40).export(out)  # these cases are about the chunked network's fields
    return out


VAE_CASES = {
    "d_model-65": lambda m: m["config"].update(d_model=65),
    "d_model-str": lambda m: m["config"].update(d_model="8"),
    "d_model-huge": lambda m: m["config"].update(d_model=65536),
    "layers-many": lambda m: m["config"].update(enc_layers=200),
    "heads-zero": lambda m: m["config"].update(n_heads=0),
    "dropout-nan": lambda m: m["config"].update(dropout=float("nan")),
    "dropout-list": lambda m: m["config"].update(dropout=[0.1]),
    "config-str": lambda m: m.update(config="vae"),
    "dim-huge": lambda m: m.update(dim=2**40),
    "dim-bool": lambda m: m.update(dim=True),
    "lr-inf": lambda m: m.update(lr=float("inf")),
}


@pytest.mark.parametrize("case", sorted(VAE_CASES))
def test_vae_config_fields_are_checked(vae_dir, tmp_path, case):
    """Issue 20 #8: ``vae.json`` ``d_model: 65`` gave a traceback; a huge size would allocate before failing."""
    from lorasynth.models.latent import load_latent

    folder = copy_model(vae_dir, tmp_path / "v")
    _edit_json(folder / "vae.json", VAE_CASES[case])
    with pytest.raises(ModelError) as err:
        load_latent(folder)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_the_intact_vae_loads(vae_dir):
    from lorasynth.models.latent import load_latent

    model = load_latent(vae_dir)
    assert model.decode(torch.zeros(1, 4)).shape == (1, 40)
