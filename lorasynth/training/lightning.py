"""Shared Lightning plumbing: one way to build a Trainer, fit, resume and plot the loss.

Every trainable lorasynth model (the LoRA-VAE, the hypernetwork, the latent diffusion
model) is a ``lightning.LightningModule`` trained through :func:`fit`, so they all get the
same things for free:

* ``out_dir/checkpoints/last.ckpt`` rewritten as training goes (resume = ``fit(...,
  resume=True)``, which hands that file to Lightning's ``ckpt_path``); checkpoints are
  loaded with ``weights_only=True`` (no arbitrary unpickling);
* a CSV log under ``out_dir/logs/version_N/metrics.csv`` (a new version per run, so a
  resumed run never deletes the earlier log);
* ``out_dir/loss_curve.png`` written at the end of training (see :class:`LossCurveCallback`);
* ``devices`` / ``accelerator`` / ``strategy`` / ``num_nodes`` / ``precision`` passed straight
  to Lightning, so the same code runs on one CPU or DDP over GPUs;
* deterministic seeding (``lightning.seed_everything``, dataloader workers included); with
  several processes each rank then reseeds with ``seed + rank`` (model initialisation
  stays identical, the noise each rank draws differs).

Training length is counted in optimizer steps (``max_steps``), not epochs: pack sizes vary
by orders of magnitude (a 2,000-entry test world vs the 65k w2w identities).

Several processes (Lightning DDP, one node or many): ``batch_size`` is per device, so one
optimizer step consumes a *global* batch of ``batch_size x devices x num_nodes`` rows and
``max_steps`` counts those steps. :func:`long_epoch_sampler` hands every rank its own
slice of each global batch (the same batches a single process with the global batch size
would see). Side effects belong to rank 0: :func:`is_global_zero` says whether this
process is it (before and after Lightning started the process group) and :func:`barrier`
lets the other ranks wait until rank 0 wrote its files.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, DistributedSampler

from lorasynth.errors import ModelError

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
LOSS_CURVE = "loss_curve.png"

_QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*Checkpoint directory .* exists and is not empty.*",
    ".*Experiment logs directory .* exists and is not empty.*",
    ".*The number of training batches .* is smaller than the logging interval.*",
    ".*You defined a `validation_step` but have no `val_dataloader`.*",
    ".*on_epoch=True.*",
    ".*The dirpath has changed from.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
)


@dataclass
class TrainConfig:
    """How to train: length, batch, optimizer step size, hardware, logging.

    ``devices="auto"`` means 1 on CPU and every visible GPU otherwise; ``devices``,
    ``accelerator``, ``strategy``, ``num_nodes`` and ``precision`` are Lightning's own
    arguments, passed through (e.g. ``devices=4, strategy="ddp"``; ``precision`` is checked
    first by :func:`check_precision`).
    ``batch_size`` is per device (one step uses ``batch_size x devices x num_nodes`` rows; see the
    module docstring). ``ckpt_every`` (steps) rewrites ``last.ckpt`` during
    training; it is always written at the end as well.
    """

    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    devices: int | str | list[int] = "auto"
    accelerator: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    ckpt_every: int = 500
    grad_clip: float | None = 1.0
    num_workers: int = 0
    val_every: int | None = None  # steps between validation runs; None = once per epoch

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_devices(cfg: TrainConfig) -> int | str | list[int]:
    """``"auto"`` -> 1 when no GPU is used (one CPU process), else Lightning's ``"auto"``."""
    if cfg.devices != "auto":
        return cfg.devices
    if cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available()):
        return 1
    return "auto"


def last_checkpoint(out_dir: str | Path) -> Path | None:
    """``out_dir/checkpoints/last.ckpt`` if it exists, else None."""
    path = Path(out_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT
    return path if path.is_file() else None


def _launch_rank_is_zero() -> bool:
    """Whether the launcher's environment names this process global rank 0.

    torchrun sets ``RANK``; SLURM (``srun``, more than one task) ``SLURM_PROCID``; Lightning's
    own launcher ``NODE_RANK`` and, for the processes it spawns, ``LOCAL_RANK``. A process
    started by hand with none of these is rank 0 (Lightning spawns the other local ranks
    from it when training starts).
    """
    env = os.environ
    if env.get("RANK", "").strip():
        return int(env["RANK"]) == 0
    if env.get("SLURM_PROCID", "").strip() and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"]) == 0
    node = int(env.get("NODE_RANK", "") or env.get("GROUP_RANK", "") or 0)
    return node == 0 and int(env.get("LOCAL_RANK", "") or 0) == 0


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(global rank, world size)`` of the running process group, ``(0, 1)`` without one."""
    if _dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_global_zero() -> bool:
    """True in the process that owns side effects (folders, exports, metadata, summaries).

    Inside or after a multi-process fit this is the process group's rank 0; before it, the
    rank the launcher gave this process (see :func:`_launch_rank_is_zero`).
    """
    if _dist_ready():
        return torch.distributed.get_rank() == 0
    return _launch_rank_is_zero()


def barrier() -> None:
    """Wait for every rank of the process group (no-op in a single process)."""
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


class _RankSeed(Callback):
    """With several processes, reseed each rank with ``seed + rank`` once the ranks are known.

    Runs in ``setup``: after the model was built (the same initialisation everywhere, and DDP
    broadcasts rank 0's weights anyway), before the first batch, so every rank draws its own
    noise (VAE samples, diffusion timesteps) instead of all ranks repeating the same draws.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.world_size > 1:
            lightning.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)


def _quiet_lightning() -> None:
    """Silence banners ("GPU available: ...", "TPU available ...") and advice-only warnings."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


class LossCurveCallback(Callback):
    """Record ``train_loss`` per step (and ``val_loss`` per validation) and plot them at train end.

    The history lives in the callback's state, which Lightning stores in the checkpoint,
    so the curve of a resumed run covers the whole training. The PNG is drawn with the
    Agg canvas directly (no pyplot, no global backend switch), on rank zero only.
    """

    def __init__(self, out_png: str | Path, smooth: int = 0) -> None:
        self.out_png = Path(out_png)
        self.smooth = smooth  # moving-average window; 0 = automatic (about 1% of the steps)
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    # -------------------------------------------------------------- recording
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.train.append((int(trainer.global_step), float(loss.detach())))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val_loss")
        if value is not None:
            self.val.append((int(trainer.global_step), float(value)))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.train:
            self.plot()

    # -------------------------------------------------------------- state (saved in checkpoints)
    def state_dict(self) -> dict[str, Any]:
        return {"train": [list(p) for p in self.train], "val": [list(p) for p in self.val]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = [(int(s), float(v)) for s, v in state_dict.get("train", [])]
        self.val = [(int(s), float(v)) for s, v in state_dict.get("val", [])]

    # -------------------------------------------------------------- drawing
    def plot(self) -> Path:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        steps = [s for s, _ in self.train]
        values = [v for _, v in self.train]
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="train_loss")
        window = self.smooth or max(1, len(values) // 100)
        if window > 1 and len(values) > window:
            sm = _moving_average(values, window)
            ax.plot(steps[window - 1 :], sm, color="tab:blue", linewidth=1.5, label=f"train_loss ({window}-step mean)")
        if self.val:
            ax.plot([s for s, _ in self.val], [v for _, v in self.val], "o-", color="tab:orange", label="val_loss")
        if all(v > 0 for v in values) and max(values) / max(min(values), 1e-30) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        from lorasynth.core.safe_io import atomic_write

        atomic_write(self.out_png, lambda f: fig.savefig(f, format="png"))
        return self.out_png


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        if i >= window - 1:
            out.append(acc / window)
    return out


_PRECISIONS = {"32-true": "32-true", "32": "32-true", "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed",
               "16-mixed": "16-mixed", "16": "16-mixed"}


def _uses_gpu(cfg: TrainConfig) -> bool:
    if cfg.accelerator in ("gpu", "cuda"):
        return True
    return cfg.accelerator == "auto" and torch.cuda.is_available()


def check_precision(cfg: TrainConfig) -> str:
    """Lightning's name for ``cfg.precision``, or ModelError when this hardware cannot train in it.

    Weights stay float32 (exports are float32): ``32-true``, or mixed precision with a
    float32 master copy. ``bf16-mixed`` runs on CPUs (autocast to bfloat16) and on GPUs
    that support bfloat16; ``16-mixed`` (float16 with loss scaling) needs a GPU.
    """
    name = str(cfg.precision).strip().lower()
    if name not in _PRECISIONS:
        raise ModelError(f"--precision {cfg.precision!r} is not supported for training; use 32-true, bf16-mixed "
                         "(CPU or GPU) or 16-mixed (GPU): weights stay float32, only the compute is mixed")
    name = _PRECISIONS[name]
    gpu = _uses_gpu(cfg)
    if name == "16-mixed" and not gpu:
        raise ModelError("--precision 16-mixed needs a GPU (float16 autocast with loss scaling); on a CPU use "
                         "bf16-mixed or 32-true")
    if name == "bf16-mixed" and gpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ModelError("--precision bf16-mixed: this GPU does not support bfloat16; use 16-mixed or 32-true")
    return name


def make_trainer(
    out_dir: str | Path, cfg: TrainConfig, extra_callbacks: Iterable[Callback] = ()
) -> lightning.Trainer:
    """A Trainer writing checkpoints, CSV logs and the loss curve under ``out_dir``.

    Seeds everything with ``cfg.seed`` first, so model initialisation done *after* this
    call is reproducible too.
    """
    _quiet_lightning()
    precision = check_precision(cfg)
    out = Path(out_dir)
    if is_global_zero():  # Lightning writes checkpoints, logs and the curve from rank 0 only
        out.mkdir(parents=True, exist_ok=True)
    lightning.seed_everything(cfg.seed, workers=True, verbose=False)
    callbacks: list[Callback] = [
        _RankSeed(cfg.seed),
        ModelCheckpoint(
            dirpath=out / CHECKPOINT_DIR,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=max(1, cfg.ckpt_every),
            enable_version_counter=False,
        ),
        LossCurveCallback(out / LOSS_CURVE),
    ]
    if cfg.progress:
        # in a log file (not a terminal) every refresh is a new line: about 20 per run
        refresh = cfg.log_every if sys.stderr.isatty() else max(cfg.log_every, cfg.max_steps // 20)
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, refresh)))
    callbacks.extend(extra_callbacks)
    val_kwargs: dict[str, Any] = {}
    if cfg.val_every:
        val_kwargs = dict(val_check_interval=cfg.val_every, check_val_every_n_epoch=None)
    return lightning.Trainer(
        default_root_dir=out,
        max_steps=cfg.max_steps,
        max_epochs=-1,
        devices=resolve_devices(cfg),
        accelerator=cfg.accelerator,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=precision,
        logger=CSVLogger(save_dir=out, name="logs"),
        log_every_n_steps=max(1, cfg.log_every),
        callbacks=callbacks,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        gradient_clip_val=cfg.grad_clip,
        num_sanity_val_steps=0,
        **val_kwargs,
    )


def fit(
    module: lightning.LightningModule,
    data: lightning.LightningDataModule | DataLoader | tuple | list,
    out_dir: str | Path,
    cfg: TrainConfig,
    resume: bool = False,
    extra_callbacks: Iterable[Callback] = (),
) -> lightning.Trainer:
    """Train ``module`` for ``cfg.max_steps`` steps; returns the finished Trainer.

    ``data`` is a LightningDataModule, a training DataLoader, or a ``(train, val)`` pair of
    DataLoaders (``val`` may be None). ``resume=True`` continues from
    ``out_dir/checkpoints/last.ckpt`` (model, optimizer, step counter, loss history) and
    raises :class:`~lorasynth.errors.ModelError` if there is none; a finished run resumed
    with a larger ``max_steps`` trains on to the new total.
    """
    ckpt_path = None
    if resume:
        ckpt_path = last_checkpoint(out_dir)
        if ckpt_path is None:
            raise ModelError(f"cannot resume: no {CHECKPOINT_DIR}/{LAST_CHECKPOINT} in {out_dir}")
    trainer = make_trainer(out_dir, cfg, extra_callbacks)
    kwargs: dict[str, Any] = dict(ckpt_path=ckpt_path)
    if "weights_only" in inspect.signature(trainer.fit).parameters:  # Lightning >= 2.5
        kwargs["weights_only"] = True  # our checkpoints hold plain values only: never unpickle code
    if isinstance(data, (tuple, list)) and len(data) != 2:
        raise ValueError("data must be a DataLoader, a LightningDataModule or a (train, val) pair")
    train = data[0] if isinstance(data, (tuple, list)) else data
    sampler = getattr(train, "sampler", None)
    with warnings.catch_warnings():
        if isinstance(sampler, StepSampler):  # resumes where it stopped: Lightning's warning does not apply
            sampler.steps_done = lambda: trainer.global_step
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch.*")
        if isinstance(data, lightning.LightningDataModule):
            trainer.fit(module, datamodule=data, **kwargs)
        elif isinstance(data, (tuple, list)):
            trainer.fit(module, train_dataloaders=data[0], val_dataloaders=data[1], **kwargs)
        else:
            trainer.fit(module, train_dataloaders=data, **kwargs)
    return trainer


class StepSampler(DistributedSampler):
    """This rank's indices for ``steps`` optimizer steps of a global batch, as one long epoch.

    The index stream is a chain of reshuffled permutations of ``range(n)``, seeded with
    ``seed + epoch`` (the same stream on every rank), at least one full pass long. Global
    batch ``k`` is stream positions ``[k*B*W, (k+1)*B*W)`` for per-device batch ``B`` and
    ``W`` ranks; rank ``r`` yields the ``r``-th slice of ``B`` of each. So ``W`` processes
    with batch ``B`` train on exactly the batches of one process with batch ``B*W``, no
    index is read by two ranks in a step, and each rank only ever touches its own rows
    (a pack :class:`~lorasynth.library.pack.PackDataset` reads them lazily from the memory map).

    Rank and world size are read from ``torch.distributed`` when iteration starts (the
    sampler is built before Lightning starts the process group). It is a
    ``DistributedSampler`` so that Lightning keeps it instead of wrapping it in its own;
    with one process it yields what ``RandomSampler(num_samples=...)`` would.
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int = 0) -> None:
        # DistributedSampler.__init__ is not called: it needs the process group, which starts later
        if n < 1 or batch_size < 1:
            raise ModelError(f"nothing to train on: {n} rows, batch size {batch_size}")
        self.n, self.batch_size, self.steps, self.seed = int(n), int(batch_size), int(steps), int(seed)
        self.epoch = 0
        self.shuffle, self.drop_last = True, False
        self.steps_done = None  # set by fit(): how many global batches a resumed run already trained
        self._iterated = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _geometry(self) -> tuple[int, int, int]:
        """``(rank, world, total stream positions)``."""
        rank, world = rank_and_world()
        return rank, world, max(self.n, (self.steps + 1) * self.batch_size * world)

    def __len__(self) -> int:
        rank, world, total = self._geometry()
        g = self.batch_size * world
        return (total // g) * self.batch_size + min(self.batch_size, max(0, total % g - rank * self.batch_size))

    def __iter__(self):
        rank, world, total = self._geometry()
        b, g = self.batch_size, self.batch_size * world
        lo, hi = rank * b, (rank + 1) * b
        skip = 0  # a resumed run goes on with the batches after the ones it trained on
        if not self._iterated and self.epoch == 0 and self.steps_done is not None:
            skip = min(int(self.steps_done()), total // g) * g
        self._iterated = True
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        pos = 0
        while pos < total:
            perm = torch.randperm(self.n, generator=gen).tolist()
            if pos + self.n <= skip:  # a whole permutation already trained on
                pos += self.n
                continue
            for i in perm[: total - pos]:
                if pos >= skip and lo <= pos % g < hi:
                    yield i
                pos += 1


def long_epoch_sampler(n: int, cfg: TrainConfig) -> StepSampler:
    """Shuffled passes over ``n`` items chained into one epoch covering all ``max_steps``,
    sharded across ranks (see :class:`StepSampler`; ``cfg.batch_size`` is per device).

    Lightning pays a fixed cost per epoch (loader reset, progress bar, validation); on a
    small library an epoch is a handful of steps, so that cost dominated training on CPU.
    Chaining reshuffled permutations keeps every item's frequency even, as epochs would.
    """
    return StepSampler(n, cfg.batch_size, cfg.max_steps, cfg.seed)


def cosine_warmup_lr(step: int, warmup: int, total: int, floor: float = 0.05) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``.

    For ``torch.optim.lr_scheduler.LambdaLR`` with ``interval="step"``.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
