"""Training across processes: Lightning DDP on CPU (gloo), real processes, as a user runs it.

* ``train vae`` / ``train hypernet`` with ``--accelerator cpu --devices 2 --strategy ddp``
  (Lightning's own launcher re-runs the command as rank 1): one export, loss falls, and the
  model is as good on held-out rows as a one-process run with the same global batch
  (2 x 32 = 64) and steps; ``--resume`` continues from the multi-process run's checkpoint.
* two "nodes" on localhost (``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK``, ``--num-nodes 2
  --devices 1``), started together: one model folder, written once.
* ``library train --shard`` by two independent processes into one library at once, and
  ``library merge``: every identity once, checksums kept, duplicates detected, verify clean.

Sizes are tiny (a 480-identity planted pack, a 16-dim latent, tens of steps): these check the
mechanics and that DDP trains the same model, not model quality.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lorasynth.apps.cli.main import main as cli

ROOT = Path(__file__).resolve().parents[2]
N_IDS = 480
STEPS = 60
VAE = ["--kind", "vae", "--latent-dim", "16", "--lr", "3e-3", "--holdout", "0.1"]
HYPER = ["--width", "64", "--depth", "1", "--lr", "2e-3"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
           and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on a small machine: threads would spin-wait on each other
    env.update(extra)
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorasynth.apps.cli.main", *args]


def run(*args: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(*args), env=_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir: Path) -> list[dict]:
    """All rows of every ``logs/version_*/metrics.csv`` under ``run_dir``, in version order."""
    rows = []
    for f in sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(f, newline="") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def losses(run_dir: Path, key: str = "train_loss") -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in metrics(run_dir) if r.get(key)]


def quality(model_dir: Path) -> dict:
    from lorasynth.synthesis.evaluation import evaluate
    from lorasynth.synthesis.synthesizer import Synthesizer

    res = evaluate(Synthesizer(str(model_dir)), strategies=("diffusion",), pca_baseline=False)
    return {"recon": res["latent"]["reconstruction_delta_cosine"],
            "diffusion": res["strategies"]["diffusion"]["delta_cosine_mean"],
            "mean_lora": res["strategies"]["mean_lora"]["delta_cosine_mean"]}


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    from lorasynth.worlds.planted import SyntheticWorldConfig, make_world, tiny_layout, write_world_pack

    world = make_world(SyntheticWorldConfig(n_identities=N_IDS, layout=tiny_layout(), seed=0))
    return write_world_pack(world, tmp_path_factory.mktemp("ddp") / "pack")


def train_single(pack: Path, out: Path) -> None:
    """The reference: one process, batch 64 (in this process: no start-up cost)."""
    common = ["--steps", str(STEPS), "--batch-size", "64", "--accelerator", "cpu", "--devices", "1", "--no-progress"]
    assert cli(["train", "vae", "--pack", str(pack), "--out", str(out), *VAE, *common]) == 0
    assert cli(["train", "hypernet", "--model", str(out), *HYPER, *common]) == 0


def train_ddp(pack: Path, out: Path) -> list[subprocess.CompletedProcess]:
    """Two processes (Lightning's launcher spawns rank 1), batch 32 per device: global batch 64."""
    common = ["--steps", str(STEPS), "--batch-size", "32", "--accelerator", "cpu", "--devices", "2",
              "--strategy", "ddp", "--no-progress"]
    return [run("train", "vae", "--pack", str(pack), "--out", str(out), *VAE, *common),
            run("train", "hypernet", "--model", str(out), *HYPER, *common)]


def test_train_vae_and_hypernet_with_ddp(pack, tmp_path, capsys):
    """One test (not several sharing a fixture): under ``pytest -n 2`` a module fixture would be
    built once per worker, and this is the expensive part of the file."""
    out, single = tmp_path / "ddp", tmp_path / "single"
    procs = train_ddp(pack, out)

    # two ranks ran; one summary, one export, one log: rank 0's
    for proc, what in zip(procs, ("trained vae", "trained hypernetwork")):
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr  # really two processes
        assert (proc.stdout + proc.stderr).count(what) == 1, proc.stdout
    assert sorted(p.name for p in (out / "latent").iterdir()) == ["vae.json", "vae.safetensors"]
    assert sorted(p.name for p in (out / "hypernet").iterdir()) == ["hypernet.json", "hypernet.safetensors"]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*tmp*"))
    for part in ("vae", "hypernet"):
        run_dir = out / "train" / part
        assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0"]
        steps = [s for s, _ in losses(run_dir)]
        assert max(steps) == STEPS - 1  # --steps counts optimizer steps of the global batch
        assert (run_dir / "loss_curve.png").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
        values = [v for _, v in losses(run_dir)]  # the loss falls
        k = max(1, len(values) // 4)
        assert np.mean(values[-k:]) < 0.9 * np.mean(values[:k]), (part, values)

    # as good on held-out rows as one process with the same global batch and steps
    train_single(pack, single)
    q_ddp, q_one = quality(out), quality(single)
    print({"ddp": q_ddp, "single": q_one})
    assert q_one["recon"] > 0.5 and q_ddp["recon"] > 0.5  # both learned (the mean LoRA scores ~0.39)
    assert abs(q_ddp["recon"] - q_one["recon"]) < 0.05, (q_ddp, q_one)
    assert abs(q_ddp["diffusion"] - q_one["diffusion"]) < 0.05, (q_ddp, q_one)
    # validation (sharded over the ranks, averaged across them) on the same held-out rows: close losses
    val = [v for _, v in losses(out / "train" / "vae", "val_loss")]
    val_one = [v for _, v in losses(single / "train" / "vae", "val_loss")]
    assert len(val) == len(val_one) and abs(val[-1] - val_one[-1]) < 0.1 * val_one[-1]

    # --resume from the 2-process run's checkpoint (here in one process with batch 64: the same
    # global batch; Lightning checkpoints do not depend on the number of devices)
    before = (out / "hypernet" / "hypernet.safetensors").read_bytes()
    capsys.readouterr()
    assert cli(["train", "hypernet", "--model", str(out), *HYPER, "--steps", str(STEPS + 10), "--batch-size", "64",
                "--accelerator", "cpu", "--devices", "1", "--no-progress", "--resume"]) == 0
    assert capsys.readouterr().out.count("trained hypernetwork") == 1
    logs = sorted((out / "train" / "hypernet" / "logs").iterdir())
    assert [p.name for p in logs] == ["version_0", "version_1"]  # the first run's log is kept
    resumed = [int(r["step"]) for r in csv.DictReader(open(logs[1] / "metrics.csv", newline="")) if r.get("train_loss")]
    assert resumed and min(resumed) >= STEPS and max(resumed) == STEPS + 9  # continued at step 60, not restarted
    assert (out / "hypernet" / "hypernet.safetensors").read_bytes() != before


def test_two_nodes_on_localhost_write_one_model(pack, tmp_path):
    out = tmp_path / "model"
    port = str(free_port())
    args = ["train", "vae", "--pack", str(pack), "--out", str(out), *VAE, "--steps", "20", "--batch-size", "32",
            "--accelerator", "cpu", "--devices", "1", "--num-nodes", "2", "--strategy", "ddp", "--no-progress"]
    procs = [subprocess.Popen(_cmd(*args), env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank),
                                                    WORLD_SIZE="2"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    assert "trained vae" in outs[0][0] and "trained vae" not in outs[1][0]  # rank 1 prints nothing
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1][0] + outs[1][1]
    assert (out / "lorasynth_model.json").is_file()
    assert sorted(p.name for p in (out / "latent").iterdir()) == ["vae.json", "vae.safetensors"]
    assert max(s for s, _ in losses(out / "train" / "vae")) == 19


# ---------------------------------------------------------------------------- in-process pieces


def test_step_sampler_shards_global_batches(monkeypatch):
    import torch

    import lorasynth.training.lightning as training
    from lorasynth.training.lightning import StepSampler

    n, b, steps = 50, 8, 12
    one = list(StepSampler(n, b, steps, seed=3))
    ref = list(torch.utils.data.RandomSampler(range(n), num_samples=(steps + 1) * b,
                                              generator=torch.Generator().manual_seed(3)))
    assert one == ref  # one process: the sampler the training used before (results unchanged)

    world = 3
    glob = list(StepSampler(n, b * world, steps, seed=3))  # one process, the global batch
    shares = []
    for rank in range(world):
        monkeypatch.setattr(training, "rank_and_world", lambda r=rank: (r, world))
        s = StepSampler(n, b, steps, seed=3)
        shares.append(list(s))
        assert len(shares[-1]) == len(s) == (steps + 1) * b
    for k in range(steps + 1):  # global batch k = the ranks' per-device batches, in rank order
        assert sum((sh[k * b:(k + 1) * b] for sh in shares), []) == glob[k * b * world:(k + 1) * b * world]

    resumed = StepSampler(n, b, steps, seed=3)
    resumed.steps_done = lambda: 5
    monkeypatch.setattr(training, "rank_and_world", lambda: (1, world))
    assert list(resumed) == shares[1][5 * b:]  # a resumed run goes on with batch 5
    assert list(resumed) == shares[1]  # only the first pass after resuming skips


@pytest.mark.parametrize("env, zero", [
    ({}, True),  # started by hand: Lightning spawns the others from it
    ({"LOCAL_RANK": "1"}, False),  # spawned by Lightning's launcher
    ({"NODE_RANK": "1"}, False), ({"NODE_RANK": "0", "LOCAL_RANK": "0"}, True),
    ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True), ({"RANK": "3", "LOCAL_RANK": "1"}, False),  # torchrun
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5"}, False), ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, True),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # srun of one task, Lightning spawns
])
def test_rank_zero_before_the_process_group_starts(monkeypatch, env, zero):
    from lorasynth.training.lightning import is_global_zero

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_global_zero() is zero


def test_precision_flags(pack, tmp_path, capsys):
    from lorasynth.errors import ModelError
    from lorasynth.training.lightning import TrainConfig, check_precision

    assert check_precision(TrainConfig(accelerator="cpu", precision="bf16-mixed")) == "bf16-mixed"
    assert check_precision(TrainConfig(accelerator="cpu", precision="32")) == "32-true"
    with pytest.raises(ModelError, match="16-mixed needs a GPU"):
        check_precision(TrainConfig(accelerator="cpu", precision="16-mixed"))
    with pytest.raises(ModelError, match="not supported for training"):
        check_precision(TrainConfig(accelerator="cpu", precision="bf16-true"))
    out = tmp_path / "m"
    args = ["train", "vae", "--pack", str(pack), "--out", str(out), "--kind", "vae", "--latent-dim", "8", "--steps", "4",
            "--batch-size", "16", "--accelerator", "cpu", "--devices", "1", "--no-progress"]
    assert cli([*args, "--precision", "16-mixed"]) == 2
    assert "16-mixed needs a GPU" in capsys.readouterr().err
    assert cli([*args, "--precision", "bf16-mixed"]) == 0  # autocast to bfloat16 on the CPU
    assert (out / "latent" / "vae.safetensors").is_file()


# ---------------------------------------------------------------------------- library building across workers


def test_library_train_shards_at_once_and_merge(tiny_pipeline_dir, tmp_path, capsys):
    from PIL import Image
    from skimage import data

    from lorasynth.runtime.apply import pipeline_tree
    from lorasynth.core.layout import W2W_TARGETS, Layout
    from lorasynth.library import Library
    from lorasynth.core.lora import LoRA, LoRAModule
    from lorasynth.runtime.pipeline import load_pipeline

    img = data.astronaut()
    ids = tmp_path / "ids"
    names = ["ann", "ben", "cid", "dot"]
    for k, name in enumerate(names):  # four "people": shifted crops
        (ids / name).mkdir(parents=True)
        Image.fromarray(np.ascontiguousarray(img[20 * k:300 + 20 * k, 40 * k:280 + 40 * k])).save(ids / name / "a.png")
    layout = Layout.for_targets(pipeline_tree(load_pipeline(str(tiny_pipeline_dir))).shapes, W2W_TARGETS, 1)
    lib_dir = tmp_path / "lib"
    Library.create(lib_dir, str(tiny_pipeline_dir), layout, embedder=None).close()

    # two independent workers (a SLURM array, a k8s Job...) write into one library at once: one in
    # a subprocess that trains each of its identities with DDP on two processes, one in this process
    args = ["library", "train", str(lib_dir), "--identities", str(ids), "--steps", "2", "--resolution", "32",
            "--lr", "0.03", "--accelerator", "cpu", "--json"]
    proc = subprocess.Popen(_cmd(*args, "--shard", "1/2", "--devices", "2", "--strategy", "ddp"), env=_env(),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    capsys.readouterr()
    assert cli([*args, "--shard", "0/2", "--devices", "1"]) == 0
    here = capsys.readouterr().out
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    import json

    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out + err
    reports = [json.loads(here), json.loads(out)]  # one JSON report per worker: DDP rank 1 printed nothing
    assert [sorted(t["name"] for t in r["trained"]) for r in reports] == [["ann", "cid"], ["ben", "dot"]]
    assert all(t["steps"] == 2 for r in reports for t in r["trained"])
    with Library.open(lib_dir) as lib:
        entries = {e.name: e for e in lib.list()}
        assert sorted(entries) == names and len(lib) == 4
        assert len({e.blob for e in entries.values()}) == 4
        assert lib.verify().ok
        ann = lib.get("ann")[1]

    # per-worker libraries merged: a duplicate (same tensors, other name) and a name conflict are reported
    other = tmp_path / "other"
    with Library.create(other, str(tiny_pipeline_dir), layout, embedder=None) as lib:
        lib.add(ann, "ann-again", source="copy")
        lib.add(LoRA({k: LoRAModule(m.down * 2, m.up, m.alpha) for k, m in ann.modules.items()}), "eve",
                source="new", attributes={"age": 30})
        lib.add(LoRA({k: LoRAModule(m.down * 3, m.up, m.alpha) for k, m in ann.modules.items()}), "ann",
                source="clash")
    merged = tmp_path / "merged"
    capsys.readouterr()
    assert cli(["library", "merge", str(merged), str(lib_dir), str(other), "--create", "--json"]) == 1  # the conflict
    report = json.loads(capsys.readouterr().out)
    assert sorted(a["name"] for a in report["added"]) == names + ["eve"]
    assert [(d["name"], d["existing_name"]) for d in report["duplicates"]] == [("ann-again", "ann")]
    assert [c["name"] for c in report["conflicts"]] == ["ann"] and report["read"] == 7
    with Library.open(merged) as lib, Library.open(lib_dir) as src:
        got = {e.name: e for e in lib.list()}
        assert sorted(got) == names + ["eve"]  # every identity once
        for e in src.list():  # checksums kept, with names, sources and attributes
            assert (got[e.name].blob, got[e.name].source, got[e.name].attributes) == (e.blob, e.source, e.attributes)
        assert got["eve"].attributes == {"age": 30}
        assert lib.verify().ok
        assert (lib.base_model, lib.layout.signature) == (src.base_model, src.layout.signature)
    assert cli(["library", "merge", str(merged), str(lib_dir)]) == 0  # re-running adds nothing
    assert "0 added, 4 duplicates" in capsys.readouterr().out
    assert cli(["library", "merge", str(merged), str(lib_dir), "--create"]) == 2  # it exists: a clear error
    assert "already holds a library" in capsys.readouterr().err
