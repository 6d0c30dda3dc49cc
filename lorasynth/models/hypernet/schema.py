"""The schema of ``hypernet.json``: the config (:class:`HypernetConfig`), field ranges, the sampler
settings, and the weight shapes a config implies.

:meth:`lorasynth.models.hypernet.model.Hypernet.load` checks a file against these before it builds
anything: every config field's type and range (:data:`HYPERNET_BOUNDS`), the ``sampling`` object
(:class:`SamplingDefaults`), and that the weights hold the sizes the config asks for
(:func:`expected_shapes`), so a crafted file is one ModelError line and allocates nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from lorasynth.core.numbers import validate_fields
from lorasynth.core.safe_io import parse_json
from lorasynth.errors import ModelError

#: Our short names for the three training targets -> diffusers' ``prediction_type`` names.
PREDICTION_TYPES = {"v": "v_prediction", "x0": "sample", "eps": "epsilon"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

#: Ranges every interface applies to the sampler knobs (CLI, Python API, server, hypernet.json).
MAX_GUIDANCE = 50.0
MAX_STEPS = 1000

_SIZE = (1, 2**20)
#: ranges of the hypernet config fields; the model holds latent_dim x latent_dim covariances, so
#: latent_dim is capped at 16384 (1 GB each)
HYPERNET_BOUNDS = {
    "latent_dim": (1, 16384), "cond_dim": (1, 65536), "width": _SIZE, "depth": (1, 1024), "mlp_ratio": (0.0, 1024.0),
    "emb_dim": (1, 65536), "cond_dropout": (0.0, 1.0), "num_train_timesteps": (1, 100_000), "clip_sample": (0.0, None),
    "dropout": (0.0, 1.0), "mean_landmarks": (1, 2**31), "pair_neighbours": (0, 2**31),
}


@dataclass
class HypernetConfig:
    """Architecture and diffusion settings of the hypernetwork (saved in ``hypernet.json``).

    latent_dim: size of the LoRA latent.
    cond_dim: size of the face embedding (128 for dlib, 512 for ArcFace; taken from the data).
    width, depth, mlp_ratio: residual-MLP trunk (hidden size of each block = width*mlp_ratio).
        Small by default: libraries have 10^3 - 10^5 people, and a large denoiser memorizes
        their residuals.
    emb_dim: size of the timestep / condition embedding that drives AdaLN.
    prediction: training target, ``"v"`` (default), ``"eps"`` or ``"x0"``. x0-prediction made
        the old model a deterministic regressor (samples of one face had pairwise cosine
        0.9999): with one LoRA per embedding the network can predict x0 from the condition
        alone and ignore the noise.
    cond_dropout: probability of replacing the condition by the null embedding in training.
    num_train_timesteps, beta_schedule, rescale_zero_snr: the noise schedule (diffusers names
        and formulas).
    clip_sample: clip predicted x0 to +-this many standard deviations while sampling (None: off).
    dropout: dropout inside the residual MLPs (regularizes small libraries).
    residual_mean: model ``z - mean(embedding)`` with a closed-form kernel-ridge mean (default);
        False = the diffusion models the whole latent.
    mean_landmarks: landmark embeddings of the kernel ridge mean (Nystroem).
    residual_condition: condition the residual diffusion on the embedding (default True). It is
        trained on pairs (a face, the residual of one of its ``pair_neighbours`` nearest training
        faces): with one LoRA per face, pairs of a face with its own residual alone taught the old
        conditioned denoiser single points, and its samples for a new face collapsed. False = an
        unconditional residual model (the same spread for every face).
    pair_neighbours: neighbours per face of those pairs (0 = chosen on validation people by the
        energy score, :func:`~lorasynth.models.hypernet.regression.choose_pair_neighbours`; 16 without
        validation rows).
    local_covariance: fit the face-dependent residual covariance
        (:class:`~lorasynth.models.hypernet.regression.LocalCovariance`, chosen on validation people) that
        gives the expected delta W in closed form (``synthesize --average``), and scale the
        residuals the diffusion models by one global factor in raw latent units (``resid_to_x0``)
        instead of per dimension (default True; needs validation rows).
    """

    latent_dim: int = 512
    cond_dim: int = 128
    width: int = 256
    depth: int = 2
    mlp_ratio: float = 2.0
    emb_dim: int = 128
    prediction: str = "v"
    cond_dropout: float = 0.2
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    rescale_zero_snr: bool = False
    clip_sample: float | None = None
    dropout: float = 0.1
    residual_mean: bool = True
    mean_landmarks: int = 1024
    residual_condition: bool = True
    pair_neighbours: int = 0
    local_covariance: bool = True

    def __post_init__(self) -> None:
        validate_fields(self, "hypernet config", HYPERNET_BOUNDS, error=ModelError)
        if self.prediction not in PREDICTION_TYPES:
            raise ModelError(
                f"hypernet prediction must be one of {sorted(PREDICTION_TYPES)}, got {self.prediction!r}"
            )
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ModelError(f"hypernet beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ModelError(f"cond_dropout must be in [0, 1), got {self.cond_dropout!r}")

    @property
    def diffusers_prediction_type(self) -> str:
        """The ``prediction_type`` string diffusers' schedulers expect."""
        return PREDICTION_TYPES[self.prediction]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HypernetConfig":
        """Build from a saved dict; unknown keys are an error (a newer, incompatible file)."""
        if not isinstance(data, dict):
            raise ModelError(f"hypernet config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"hypernet config has unknown fields {unknown}; written by a newer lorasynth?")
        return cls(**data)


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """The shapes of the weights that fix every size a ``Hypernet`` of ``config`` (a ``HypernetConfig``) allocates.

    ``Hypernet.load`` compares them with the file before building the model, so a crafted config
    (``width: 10**6``, ``depth: 1000``) is refused without allocating its weights. Mirrors
    ``Denoiser.__init__`` (a test checks both agree).
    """
    c = config
    hidden = max(1, int(round(c.width * c.mlp_ratio)))
    out = {"net.time_mlp.0.weight": (c.emb_dim, c.emb_dim), "net.cond_mlp.0.weight": (c.emb_dim, c.cond_dim),
           "net.in_proj.weight": (c.width, c.latent_dim), "net.out_proj.weight": (c.latent_dim, c.width)}
    for i in range(c.depth):
        out[f"net.blocks.{i}.mlp.0.weight"] = (hidden, c.width)
        out[f"net.blocks.{i}.modulation.weight"] = (3 * c.width, c.emb_dim)
    return out


@dataclass
class SamplingDefaults:
    """The ``sampling`` object of ``hypernet.json``: the sampler settings training calibrated.

    ``num_steps`` may not exceed the noise schedule's ``num_train_timesteps`` (the sampler would run
    fewer steps than provenance records); guidance and steps have the ranges every interface uses.
    """

    num_steps: int
    guidance: float
    eta: float
    scheduler: str

    @classmethod
    def from_dict(cls, data, where: str, train_timesteps: int, defaults: dict,
                  schedulers: tuple[str, ...]) -> "SamplingDefaults":
        """``data`` over ``defaults`` (other keys are ignored), every field checked; one ModelError line otherwise."""
        if not isinstance(data, dict):
            raise ModelError(f"{where}: sampling must be a JSON object, got {type(data).__name__}")
        merged = {**defaults, **data}
        out = cls(**{f.name: merged[f.name] for f in fields(cls)})
        validate_fields(out, f"{where}: sampling", {"num_steps": (1, min(MAX_STEPS, train_timesteps)),
                                                    "guidance": (0.0, MAX_GUIDANCE), "eta": (0.0, 1.0)}, error=ModelError)
        if out.scheduler not in schedulers:
            raise ModelError(f"{where}: sampling scheduler must be one of {schedulers}, got {out.scheduler!r}")
        return out


def parse_config_file(raw: bytes, cfg_path, format_name: str, format_version: int) -> tuple[int, dict, object]:
    """``(version, config dict, sampling value)`` of ``hypernet.json`` bytes; one ModelError line otherwise.

    Version-1 files get the settings they were trained with (no closed-form mean, eta 0).
    """
    meta = parse_json(raw, f"{cfg_path} (hypernetwork config)", error=ModelError)
    if meta.get("format") != format_name:
        raise ModelError(f"{cfg_path} is not a lorasynth hypernetwork config")
    version = meta.get("version", 0)
    if type(version) is not int or version < 0:
        raise ModelError(f"{cfg_path}: version must be a non-negative integer, got {version!r}"[:200])
    if version > format_version:
        raise ModelError(f"{cfg_path} has format version {version}; upgrade lorasynth")
    raw_cfg = meta.get("config", {})
    if not isinstance(raw_cfg, dict):
        raise ModelError(f"{cfg_path}: config must be an object")
    raw_cfg = dict(raw_cfg)
    sampling = meta.get("sampling", {})
    if version < 2:  # version 1: no closed-form mean, the diffusion modelled the whole latent
        raw_cfg.setdefault("residual_mean", False)
        for key, old in (("width", 512), ("depth", 3), ("prediction", "x0"), ("cond_dropout", 0.1), ("dropout", 0.0)):
            raw_cfg.setdefault(key, old)
        if isinstance(sampling, dict):
            sampling = {"eta": 0.0, **sampling}
    return version, raw_cfg, sampling


def check_shapes(tensors: dict, config, w_path) -> None:
    """The weights hold the sizes ``config`` asks for (:func:`expected_shapes`); one ModelError line otherwise."""
    for key, want in expected_shapes(config).items():
        got = tensors.get(key)
        if got is None or tuple(got.shape) != want:
            raise ModelError(f"{w_path} does not match its config: size mismatch for {key}: the file holds "
                             f"{'nothing' if got is None else tuple(got.shape)}, the config needs {want}")
