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
* deterministic seeding (``lightning.seed_everything``, dataloader workers included).

Training length is counted in optimizer steps (``max_steps``), not epochs: pack sizes vary
by orders of magnitude (a 2,000-entry test world vs the 65k w2w identities).
"""

from __future__ import annotations

import inspect
import logging
import math
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
from torch.utils.data import DataLoader

from .errors import ModelError

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
    arguments, passed through unchanged (e.g. ``devices=4, strategy="ddp"``).
    ``batch_size`` is per device. ``ckpt_every`` (steps) rewrites ``last.ckpt`` during
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
        from .formats.safe_io import atomic_write

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


def make_trainer(
    out_dir: str | Path, cfg: TrainConfig, extra_callbacks: Iterable[Callback] = ()
) -> lightning.Trainer:
    """A Trainer writing checkpoints, CSV logs and the loss curve under ``out_dir``.

    Seeds everything with ``cfg.seed`` first, so model initialisation done *after* this
    call is reproducible too.
    """
    _quiet_lightning()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lightning.seed_everything(cfg.seed, workers=True, verbose=False)
    callbacks: list[Callback] = [
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
        precision=cfg.precision,
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
    if isinstance(data, lightning.LightningDataModule):
        trainer.fit(module, datamodule=data, **kwargs)
    elif isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError("data must be a DataLoader, a LightningDataModule or a (train, val) pair")
        trainer.fit(module, train_dataloaders=data[0], val_dataloaders=data[1], **kwargs)
    else:
        trainer.fit(module, train_dataloaders=data, **kwargs)
    return trainer


def long_epoch_sampler(n: int, cfg: TrainConfig) -> torch.utils.data.RandomSampler:
    """Shuffled passes over ``n`` items chained into one epoch covering all ``max_steps``.

    Lightning pays a fixed cost per epoch (loader reset, progress bar, validation); on a
    small library an epoch is a handful of steps, so that cost dominated training on CPU.
    Chaining reshuffled permutations keeps every item's frequency even, as epochs would.
    """
    total = max(n, (cfg.max_steps + 1) * cfg.batch_size)
    return torch.utils.data.RandomSampler(range(n), replacement=False, num_samples=total,
                                          generator=torch.Generator().manual_seed(cfg.seed))


def cosine_warmup_lr(step: int, warmup: int, total: int, floor: float = 0.05) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``.

    For ``torch.optim.lr_scheduler.LambdaLR`` with ``interval="step"``.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
