"""Synthesize a LoRA from one face: four strategies behind one interface.

* ``diffusion`` (default, the paper's method): the hypernetwork samples a latent
  conditioned on the face embedding with classifier-free guidance; the latent model
  decodes it into a LoRA. No training at synthesis time.
* ``blend``: the linear-combination baseline: softmax over cosine similarity of the top-k
  library embeddings, exact weighted sum of those LoRAs' updates.
* ``nearest``: the library LoRA whose embedding is most similar.
* ``sample``: a new identity, unconditional (hypernetwork without condition).

Library lookups use the model's training rows of its pack (held-out rows never leak in).
Outputs are kohya ``.safetensors`` files with provenance metadata.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorasynth import __version__
from lorasynth.core.blending import blend as blend_loras
from lorasynth.core.numbers import parse_float, parse_int
from lorasynth.errors import InputError, LorasynthError, ModelError
from lorasynth.formats import save_lora, synthesized_metadata
from lorasynth.core.lora import LoRA
from lorasynth.models.hypernet.model import CONFIG_FILE, MAX_GUIDANCE, MAX_STEPS
from lorasynth.models.hypernet.regression import cosine_top_k, softmax_weights
from lorasynth.models.latent import decode_rows
from lorasynth.models.model_folder import SynthesisModel

STRATEGIES = ("diffusion", "blend", "nearest", "sample")
#: The default strategy: the model's (``hypernet.json``'s ``defaults.strategy``, chosen on validation
#: people by ``train hypernet``), else ``diffusion``; with ``average`` or ``samples > 1``, diffusion.
AUTO = "auto"
#: Blend settings when neither the caller nor the model gives them.
BLEND_K, BLEND_TEMPERATURE = 8, 0.05
MAX_SAMPLES = 256  # LoRAs one call may write (each is a file of a few MB)


@dataclass
class SynthesisSettings:
    strategy: str = AUTO  # "auto": the model's default strategy (Synthesizer.resolve)
    guidance: float | None = None  # None: the hypernetwork's recorded default
    steps: int | None = None
    seed: int = 0
    samples: int = 1
    k: int | None = None  # blend: neighbours (None: the model's, chosen on validation; else BLEND_K)
    temperature: float | None = None  # blend: softmax temperature on cosine similarity (None: the model's)
    # diffusion: ONE LoRA. samples=1: the model's expected delta W for the face, in closed form
    # (Hypernet.expected_latents; the limit of the mean of N samples); samples=N: the exact mean of N
    average: bool = False
    average_rank: int = 32  # rank of the expected-delta-W LoRA (optimal SVD truncation, error recorded)

    def validate(self) -> None:
        """Every knob's type and range, the same rule for the CLI, the Python API, the server and ComfyUI
        (:mod:`lorasynth.core.numbers`): one InputError line, never a NaN LoRA or a silent clamp.

        guidance 0..50 (``MAX_GUIDANCE``), steps 1..1000 (``MAX_STEPS``), seed 0..2**63-1, samples
        1..256, k >= 1, temperature > 0, average_rank >= 1. Values are normalized in place (ints, floats).
        """
        if self.strategy not in STRATEGIES and self.strategy != AUTO:
            raise LorasynthError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.guidance is not None:
            self.guidance = parse_float(self.guidance, "guidance", minimum=0.0, maximum=MAX_GUIDANCE)
        if self.steps is not None:
            self.steps = parse_int(self.steps, "steps", minimum=1, maximum=MAX_STEPS)
        self.seed = parse_int(self.seed, "seed", minimum=0)
        self.samples = parse_int(self.samples, "samples", minimum=1, maximum=None)
        if self.samples > MAX_SAMPLES:
            raise InputError(f"--samples {self.samples} is more than {MAX_SAMPLES} at once; run several seeds instead")
        if self.k is not None:
            self.k = parse_int(self.k, "k", minimum=1)
        if self.temperature is not None:
            self.temperature = parse_float(self.temperature, "temperature", above=0.0)
        self.average_rank = parse_int(self.average_rank, "average_rank", minimum=1)


@dataclass
class Synthesized:
    lora: LoRA
    provenance: dict[str, str]
    vector: np.ndarray | None = None  # flat canonical vector when the strategy yields one
    timings: dict[str, float] = field(default_factory=dict)


class Synthesizer:
    """Loads a model folder once; synthesizes many LoRAs fast (warm).

    >>> import lorasynth
    >>> syn = lorasynth.Synthesizer.from_pretrained("my-model")     # doctest: +SKIP
    >>> lora = syn("me.jpg", seed=0)                                 # doctest: +SKIP
    >>> lora.save("me.safetensors")                                  # doctest: +SKIP
    """

    def __init__(self, model_dir: str | Path | SynthesisModel, pack: str | Path | None = None,
                 model_root: str | None = None):
        self.model = model_dir if isinstance(model_dir, SynthesisModel) else SynthesisModel.open(model_dir)
        self.model.start_verify()  # weights are hashed in the background; loading a part waits for it
        self.layout = self.model.layout
        self._pack_override = pack
        self._model_root = model_root
        self._pack = self._latent = self._hypernet = self._embedder = None
        self._defaults: dict | None = None
        self._expected_delta = None  # synthesis.expected.ExpectedDelta, built on the first --average
        self._lib_emb = None
        self._hash = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, pack: str | Path | None = None, model_root: str | None = None,
                        revision: str | None = None, cache_dir: str | Path | None = None) -> "Synthesizer":
        """A Synthesizer for a local model folder or a Hugging Face hub id (``"org/name"``).

        Hub models come through ``huggingface_hub`` (its cache; ``HF_HUB_OFFLINE=1`` uses only
        the cache). ``pack`` overrides the training pack (nearest/blend strategies);
        ``model_root`` is the insightface model root for ArcFace models.
        """
        return cls(SynthesisModel.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir),
                   pack=pack, model_root=model_root)

    def __call__(self, photo=None, *, embedding=None, strategy: str = AUTO, seed: int = 0,
                 guidance: float | None = None, steps: int | None = None, k: int | None = None,
                 temperature: float | None = None,
                 face_index: int | None = None, average: bool = False) -> LoRA:
        """One LoRA for a face ``photo`` (path, PIL image or RGB array) or a face ``embedding``.

        ``average=True`` (diffusion): the model's expected delta W for the face (fidelity) instead
        of one sample (variety: try several seeds).

        ``strategy``: ``"auto"`` (default: the model's default strategy, one diffusion sample unless
        ``train hypernet`` found a better one on validation people), ``"diffusion"`` (one sample),
        ``"blend"`` (top-``k`` library neighbours; ``k`` and ``temperature`` default to the model's,
        chosen on validation), ``"nearest"``, or ``"sample"`` (a new identity; no photo). The LoRA's ``metadata`` holds
        its provenance (``lorasynth.strategy``, ``lorasynth.seed``, ``lorasynth.model_hash``...).

        >>> lora = syn("me.jpg", seed=0)                      # doctest: +SKIP
        >>> lora = syn(embedding=e, strategy="blend")         # doctest: +SKIP
        """
        if photo is not None and embedding is not None:
            raise LorasynthError("give a photo or an embedding, not both")
        source = ""
        if photo is not None:
            embedding, _ = self.embed_photo(photo, face_index)
            source = Path(photo).name if isinstance(photo, (str, Path)) else ""
        settings = SynthesisSettings(strategy=strategy, guidance=guidance, steps=steps, seed=seed, k=k,
                                     temperature=temperature, average=average)
        return self.synthesize(embedding, settings, source=source)[0].lora

    # ---------------------------------------------------------------- lazy parts
    @property
    def pack(self):
        if self._pack is None:
            self._pack = self.model.open_pack(self._pack_override)
        return self._pack

    @property
    def latent(self):
        if self._latent is None:
            self._latent = self.model.load_latent()
        return self._latent

    @property
    def hypernet(self):
        if self._hypernet is None:
            self._hypernet = self.model.load_hypernet()
        return self._hypernet

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            self._hash = self.model.model_hash()
        return self._hash

    @property
    def train_rows(self) -> np.ndarray:
        """The pack rows the model was trained on (checked: a model folder is untrusted input too)."""
        rows = np.asarray(self.model.info.train_ids)
        n = len(self.pack)
        if rows.ndim != 1 or rows.size == 0 or rows.dtype.kind not in "iu" or rows.min() < 0 or rows.max() >= n:
            raise ModelError(f"{self.model.path}: its train_ids do not index its pack's {n} rows "
                             "(wrong --pack, or a damaged model folder)")
        return rows

    def library_embeddings(self) -> np.ndarray:
        """Unit-normalized embeddings of the training rows (cached)."""
        if self._lib_emb is None:
            e = self.pack.read_embeddings(self.train_rows).astype(np.float32)
            self._lib_emb = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return self._lib_emb

    def model_defaults(self) -> dict:
        """The model's ``defaults`` (``hypernet.json``, written by ``train hypernet``): ``strategy`` and
        ``blend`` (``k``, ``temperature``) chosen on validation people; ``{}`` for older models."""
        if self._defaults is None:
            self._defaults = {}
            path = self.model.hypernet_dir / CONFIG_FILE
            if self.model.info.has_hypernet and path.is_file():
                from lorasynth.core.safe_io import parse_json

                # the same checked read as the hypernetwork's loader (SHA-256 on the bytes parsed)
                raw = self.model.read_part(f"{path.parent.name}/{CONFIG_FILE}")
                meta = parse_json(raw, f"{path} (hypernetwork config)", error=ModelError)
                d = meta.get("defaults")
                if isinstance(d, dict):
                    self._defaults = check_defaults(d, path)
        return self._defaults

    def resolve(self, s: SynthesisSettings) -> SynthesisSettings:
        """``s`` with ``auto`` and unset blend settings replaced by the model's defaults (a copy)."""
        from dataclasses import replace

        d = self.model_defaults()
        blend = d.get("blend", {})
        k = s.k if s.k is not None else blend.get("k", BLEND_K)
        temperature = s.temperature if s.temperature is not None else blend.get("temperature", BLEND_TEMPERATURE)
        strategy, average = s.strategy, s.average
        if strategy == AUTO:
            strategy = d.get("strategy", "diffusion") if not (s.average or s.samples > 1) else "diffusion"
            if strategy == "average":
                strategy, average = "diffusion", True
        return replace(s, strategy=strategy, average=average, k=int(k), temperature=float(temperature))

    # ---------------------------------------------------------------- faces
    def embed_photo(self, photo, face_index: int | None = None):
        """``(embedding, FaceSelection)`` with the model's embedder."""
        from lorasynth.faces import get_embedder

        name = self.model.info.embedder
        if name not in ("dlib", "arcface"):
            raise ModelError(f"this model was trained on '{name}' embeddings; it cannot embed photos (use --embedding)")
        selection = get_embedder(name, model_root=self._model_root).embed_with_report(photo, face_index=face_index)
        return selection.face.embedding.astype(np.float32), selection

    def check_embedding(self, embedding) -> np.ndarray:
        """A unit float32 embedding of the model's dimension (1-D, real, finite, non-zero), or a one-line error."""
        from lorasynth.faces.embeddings import check_embedding

        e = check_embedding(embedding, "embedding")
        if e.shape[0] != self.model.info.embed_dim:
            raise LorasynthError(f"embedding has {e.shape[0]} dims, the model expects {self.model.info.embed_dim} "
                                 f"({self.model.info.embedder})")
        return e

    # ---------------------------------------------------------------- strategies on vectors
    def neighbours(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k pack rows and cosine similarities for each embedding row (B, E), most similar first."""
        sims, top = cosine_top_k(torch.from_numpy(np.atleast_2d(embeddings)), torch.from_numpy(self.library_embeddings()), k)
        return self.train_rows[top.numpy()], sims.numpy()

    def blend_weights(self, sims: np.ndarray, temperature: float) -> np.ndarray:
        """``softmax(cos / temperature)``: the blend strategy's weights."""
        return softmax_weights(torch.as_tensor(sims), temperature).numpy()

    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Latents -> raw flat canonical LoRA vectors (float32)."""
        return decode_rows(self.latent, z, np.float32)

    @torch.no_grad()
    def diffusion_latents(self, embeddings: np.ndarray | None, settings: SynthesisSettings) -> torch.Tensor:
        cond = None if embeddings is None else torch.from_numpy(np.atleast_2d(embeddings)).float()
        return self.hypernet.sample(cond, num_steps=settings.steps, guidance=settings.guidance, seed=settings.seed,
                                    n_samples=settings.samples, center=settings.average and cond is not None)

    # ---------------------------------------------------------------- main entry
    def synthesize(self, embedding=None, settings: SynthesisSettings | None = None, source: str = "") -> list[Synthesized]:
        """LoRAs for one face embedding (or new identities with strategy ``sample``)."""
        s = settings or SynthesisSettings()
        s.validate()
        s = self.resolve(s)
        prov = {
            "lorasynth.version": __version__,
            "lorasynth.strategy": s.strategy,
            "lorasynth.embedder": self.model.info.embedder,
            "lorasynth.model_hash": self.model_hash,
            "lorasynth.layout": self.layout.signature,
            "lorasynth.seed": str(s.seed),
        }
        if source:
            prov["lorasynth.source"] = source
        prov.update(synthesized_metadata())  # trigger phrase "sks person" (modelspec.trigger_phrase, ss_tag_frequency)
        t0 = time.perf_counter()
        if s.strategy == "sample":
            z = self.diffusion_latents(None, s)
            prov["lorasynth.guidance"] = "unconditional"
            return self._from_latents(z, prov, t0)
        if embedding is None:
            raise LorasynthError(f"strategy {s.strategy} needs a face photo or embedding")
        e = self.check_embedding(embedding)
        if s.strategy == "diffusion" and s.average and s.samples == 1:
            return [self._expected(e, s, prov, t0)]
        if s.strategy == "diffusion":
            z = self.diffusion_latents(e, s)
            g = s.guidance if s.guidance is not None else self.hypernet.sampling_defaults.get("guidance")
            prov["lorasynth.guidance"] = str(g)
            steps = s.steps or self.hypernet.sampling_defaults.get("num_steps")
            prov["lorasynth.steps"] = str(len(self.hypernet.timesteps(int(steps))))  # the steps that ran
            results = self._from_latents(z, prov, t0)
            if s.average and len(results) > 1:
                return [self._average(results, prov)]
            return results
        rows, sims = self.neighbours(e, 1 if s.strategy == "nearest" else s.k)
        rows, sims = rows[0], sims[0]
        if s.strategy == "nearest":
            vec = self.pack.read_rows(rows[:1])[0]
            prov["lorasynth.neighbours"] = json.dumps({"ids": [self.pack.ids[rows[0]]], "cosine": [float(sims[0])]})
            lora = self.layout.unflatten(torch.from_numpy(vec))
            lora.metadata.update(prov)
            return [Synthesized(lora, prov, vec, {"sampling_s": time.perf_counter() - t0})]
        weights = self.blend_weights(sims, s.temperature)
        vecs = self.pack.read_rows(rows)
        loras = [self.layout.unflatten(torch.from_numpy(v)) for v in vecs]
        lora, _ = blend_loras(loras, weights.tolist())
        prov["lorasynth.neighbours"] = json.dumps(
            {"ids": [self.pack.ids[r] for r in rows], "cosine": sims.round(4).tolist(), "weights": weights.round(4).tolist()})
        lora.metadata.update(prov)
        return [Synthesized(lora, prov, None, {"sampling_s": time.perf_counter() - t0})]

    def _expected(self, e: np.ndarray, s: SynthesisSettings, prov: dict, t0: float) -> Synthesized:
        """One LoRA: the model's expected delta W for the face (exact mean over sigma points, then the
        optimal rank-``average_rank`` truncation; its relative error is in the metadata)."""
        cond = torch.from_numpy(np.atleast_2d(e)).float()
        if self.model.info.latent_kind == "pca":
            # exact for an affine decoder: delta W is quadratic in the latent, so its expectation is
            # B(mu) A(mu) plus the covariance term, computed in factor space (synthesis.expected)
            if self._expected_delta is None:
                from lorasynth.synthesis.expected import ExpectedDelta

                self._expected_delta = ExpectedDelta(self.latent, self.hypernet, self.layout)
            t1 = time.perf_counter()
            lora, report = self._expected_delta.lora(cond, s.average_rank)
            extra = {"lorasynth.expectation": "exact", "lorasynth.expectation_tail": f"{report.tail:.3g}"}
        else:  # an unscented approximation through a VAE's nonlinear decoder: 2m sigma points
            z = self.hypernet.expected_latents(cond)
            t1 = time.perf_counter()
            loras = [self.layout.unflatten(torch.from_numpy(v)) for v in self.decode(z)]
            n = len(loras)
            lora, report = blend_loras(loras, [1.0 / n] * n, rank=s.average_rank)
            extra = {"lorasynth.expectation": "unscented approximation (VAE decoder)", "lorasynth.sigma_points": str(n)}
        meta = dict(prov, **{"lorasynth.average_of": "expectation", **extra,
                             "lorasynth.average_rank": str(report.rank),
                             "lorasynth.average_rank_error": f"{report.overall_error:.3g}"})
        lora.metadata.update(meta)
        return Synthesized(lora, meta, None, {"sampling_s": t1 - t0, "decoding_s": time.perf_counter() - t1})

    def _average(self, results: list[Synthesized], prov: dict) -> Synthesized:
        """One LoRA whose delta W is exactly the mean of the samples' (ranks concatenate)."""
        n = len(results)
        lora, _ = blend_loras([r.lora for r in results], [1.0 / n] * n)
        meta = dict(prov, **{"lorasynth.average_of": str(n)})
        lora.metadata.update(meta)
        timings = {k: sum(r.timings.get(k, 0.0) for r in results) / n for k in results[0].timings}
        return Synthesized(lora, meta, None, timings)

    def _from_latents(self, z: torch.Tensor, prov: dict, t0: float) -> list[Synthesized]:
        t1 = time.perf_counter()
        vecs = self.decode(z)
        t2 = time.perf_counter()
        out = []
        for i, v in enumerate(vecs):
            lora = self.layout.unflatten(torch.from_numpy(v))
            meta = dict(prov, **{"lorasynth.sample_index": str(i)})
            lora.metadata.update(meta)
            out.append(Synthesized(lora, meta, v, {"sampling_s": t1 - t0, "decoding_s": t2 - t1}))
        return out


def check_defaults(d: dict, path) -> dict:
    """A ``defaults`` object of ``hypernet.json`` checked (a model folder is untrusted input)."""
    strategy = d.get("strategy", "diffusion")
    blend = d.get("blend", {})
    ok = strategy in ("diffusion", "average", "blend", "nearest") and isinstance(blend, dict)
    k, t = blend.get("k", BLEND_K) if ok else None, blend.get("temperature", BLEND_TEMPERATURE) if ok else None
    ok = ok and isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 4096 and \
        isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1e6
    if not ok:
        raise ModelError(f"{path}: 'defaults' must name a strategy of diffusion, average, blend, nearest and a blend "
                         "with an integer k >= 1 and a temperature > 0")
    return {"strategy": strategy, "blend": {"k": k, "temperature": float(t)}}


def write_synthesized(result: Synthesized, path: str | Path, fmt: str = "kohya") -> Path:
    """Write a synthesized LoRA (kohya by default) with its provenance metadata."""
    return save_lora(result.lora, path, fmt)
