"""Load an SD1.5 pipeline on CPU, pick a scheduler, generate deterministically, save PNGs.

A thin, explicit layer over diffusers' ``StableDiffusionPipeline``:

* :func:`load_pipeline` loads a local diffusers folder, a hub id, or a single ``.safetensors``
  checkpoint, and turns every failure into one clear :class:`~lorasynth.errors.ModelError`
  line instead of a hub traceback (or a silent 2-token tokenizer, see
  :func:`lorasynth.runtime.tokenizer.check_tokenizer`).
* :func:`generate` runs one prompt from a :class:`GenerationSettings`; the same settings give
  the same pixels (CPU generator seeded from ``settings.seed``).
* :func:`save_png` writes the image with its settings embedded, A1111-style, so a picture can
  always be traced back to how it was made.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
)

from lorasynth import __version__
from lorasynth.errors import LorasynthError, ModelError
from lorasynth.core.safe_io import parse_json
from lorasynth.runtime.speed import (load_tiny_vae, load_unet_lowmem, prompt_embeddings, resolve_dtype,
                                     set_vae_tiling)
from lorasynth.runtime.tokenizer import check_tokenizer

#: Scheduler names accepted by :func:`set_scheduler` and :class:`GenerationSettings`.
SCHEDULERS = {
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "lcm": LCMScheduler,
    "ddim": DDIMScheduler,
}

#: dtype names accepted by :func:`load_pipeline` (and ``"auto"``: :func:`lorasynth.runtime.speed.resolve_dtype`).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_PROGRESS_BAR = {"leave": False, "desc": "denoising"}


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """diffusers >= 0.42 renamed ``torch_dtype`` to ``dtype`` (the old name warns); support both."""
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 42) else {"torch_dtype": dtype}


def _looks_like_path(base: str) -> bool:
    """True if ``base`` can only be meant as a local path (a hub id is ``name`` or ``org/name``)."""
    return (
        os.path.isabs(base)
        or base.startswith((".", "~"))
        or "\\" in base
        or base.count("/") > 1
        or base.lower().endswith((".safetensors", *_PICKLE_SUFFIXES))
    )


def _missing_model_error(base: str, why: str, detail: str = "") -> ModelError:
    """One line: what failed, what to do, then (shortened) what the library underneath said."""
    message = (
        f"cannot load base model {base!r}: {why}. Point it at a local diffusers-format SD1.5 folder "
        f"(one with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
    )
    return ModelError(f"{message} [{detail}]" if detail else message)


def load_pipeline(
    base: str,
    dtype: str = "auto",
    channels_last: bool = True,
    device: str = "cpu",
    config: str | None = None,
    tiny_vae: str | None = None,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion 1.5 pipeline, without safety checker, ready for CPU inference.

    Args:
        base: a local diffusers folder (loaded with ``local_files_only=True``), a hub id such
            as ``"stable-diffusion-v1-5/stable-diffusion-v1-5"`` (needs the network or the hub
            cache), or a single-file ``.safetensors`` checkpoint. Pickle checkpoints
            (``.ckpt``, ``.pt``, ``.bin``...) are refused: loading them can run arbitrary code.
        dtype: ``"auto"`` (default: bf16 on CPUs with AMX or AVX512-BF16, where it is about 2.5x
            faster per step, else fp32), ``"fp32"`` (the reference) or ``"bf16"``.
        channels_last: store the UNet and VAE weights in channels-last memory format
            (about 20% faster UNet on CPU).
        device: torch device to move the pipeline to.
        config: single-file checkpoints only: a diffusers folder or hub id holding the
            component configs (diffusers otherwise fetches them from the hub).
        tiny_vae: a local ``AutoencoderTiny`` (TAESD) folder to decode with instead of the
            model's VAE (much faster, rougher images; for previews and few-step generation).

    Raises:
        ModelError: the model is missing, unreachable, broken, or its tokenizer is unusable.
    """
    dtype = resolve_dtype(dtype, device)
    common = dict(safety_checker=None, requires_safety_checker=False, **_dtype_kwargs(DTYPES[dtype]))
    path = Path(base).expanduser()

    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelError(
            f"refusing to load {base!r}: pickle checkpoints can execute code when loaded; "
            f"convert it to .safetensors or a diffusers folder first"
        )
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise _missing_model_error(base, "no such file")
        try:
            pipe = StableDiffusionPipeline.from_single_file(str(path), config=config, **common)
        except Exception as exc:  # diffusers raises many kinds here; keep one line
            raise ModelError(
                f"cannot load single-file checkpoint {base!r}: {_first_line(exc)}. Without network, pass "
                f"config=<a diffusers SD1.5 folder> for the component configs, or use a diffusers folder"
            ) from exc
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise _missing_model_error(base, "the folder has no model_index.json (not a diffusers pipeline)")
        try:
            unet = load_unet_lowmem(path, DTYPES[dtype])  # peak memory: the model plus one tensor
            pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True,
                                                           **({} if unet is None else {"unet": unet}), **common)
        except Exception as exc:
            raise ModelError(f"cannot load base model {base!r}: the folder is incomplete or broken: {_first_line(exc)}") from exc
    elif path.exists():
        raise _missing_model_error(base, "it is neither a folder nor a .safetensors checkpoint")
    elif _looks_like_path(base):
        raise _missing_model_error(base, "no such folder")
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(base, **common)
        except Exception as exc:
            raise _missing_model_error(
                base, "not a local folder, and the hub did not provide it (offline? wrong id?)", _first_line(exc)
            ) from exc

    check_tokenizer(pipe.tokenizer)
    pipe.set_progress_bar_config(disable=False, **_PROGRESS_BAR)
    if tiny_vae:
        pipe.vae = load_tiny_vae(tiny_vae, DTYPES[dtype])
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe.to(device)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_scheduler(pipe: StableDiffusionPipeline, name: str) -> None:
    """Replace ``pipe.scheduler`` by the named scheduler, built from the current scheduler config.

    The shared settings (betas, timestep spacing, prediction type...) carry over, so switching
    back and forth gives the same scheduler each time.
    """
    if name not in SCHEDULERS:
        raise LorasynthError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    cls = SCHEDULERS[name]
    config = pipe.scheduler.config
    # Pass on only what the new class accepts and the old one did not merely default
    # (diffusers' `_use_default_values`): no drift when switching back and forth, and no
    # "config attributes ... are not expected" warning for e.g. PNDM's `skip_prk_steps`.
    accepted = inspect.signature(cls.__init__).parameters
    defaulted = set(config.get("_use_default_values", ()))
    kept = {k: v for k, v in config.items() if k in accepted and k not in defaulted}
    pipe.scheduler = cls.from_config(kept)


@dataclass
class GenerationSettings:
    """Everything that determines an image (besides the model and LoRAs), stored in its PNG."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    scheduler: str = "dpm"
    dtype: str = "auto"  # "auto": the pipeline's (generate() writes the resolved name back)

    def validate(self) -> None:
        """Raise LorasynthError for values the pipeline would reject or misuse."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if value <= 0 or value % 8:
                raise LorasynthError(f"{name} must be a positive multiple of 8 (the VAE downscales by 8), got {value}")
        if self.steps < 1:
            raise LorasynthError(f"steps must be at least 1, got {self.steps}")
        if self.scheduler not in SCHEDULERS:
            raise LorasynthError(f"unknown scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        if self.dtype not in DTYPES and self.dtype != "auto":
            raise LorasynthError(f"unknown dtype {self.dtype!r}; valid: auto, {', '.join(DTYPES)}")


def generate(pipe: StableDiffusionPipeline, settings: GenerationSettings, progress: bool = True, on_step=None):
    """Generate one image; identical settings (and model) give identical pixels.

    ``on_step(step, total)`` is called after each denoising step (progress; raise to cancel).

    Sets ``pipe.scheduler`` to ``settings.scheduler`` (it stays set afterwards). The initial
    noise comes from a CPU ``torch.Generator`` seeded with ``settings.seed``. ``settings.dtype``
    ``"auto"`` is set to the pipeline's dtype (so the PNG records what ran). The prompt is encoded
    once per prompt and text-encoder weights (:func:`lorasynth.runtime.speed.prompt_embeddings`),
    and the VAE decodes in tiles above 1024 x 1024 pixels.

    Returns:
        a ``PIL.Image.Image`` of ``settings.width`` x ``settings.height``.
    """
    settings.validate()
    if settings.dtype == "auto":
        settings.dtype = next((k for k, v in DTYPES.items() if v == pipe.unet.dtype), "fp32")
    if pipe.unet.dtype != DTYPES[settings.dtype]:
        raise LorasynthError(
            f"settings.dtype is {settings.dtype!r} but the pipeline was loaded as {pipe.unet.dtype}; "
            f"load it with load_pipeline(..., dtype={settings.dtype!r})"
        )
    set_scheduler(pipe, settings.scheduler)
    pipe.set_progress_bar_config(disable=not progress, **_PROGRESS_BAR)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    set_vae_tiling(pipe, settings.width, settings.height)
    pos, neg = prompt_embeddings(pipe, settings.prompt, settings.negative_prompt, settings.guidance)
    with torch.inference_mode():
        result = pipe(
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            width=settings.width,
            height=settings.height,
            generator=generator,
            output_type="pil",
            **({} if on_step is None else {"callback_on_step_end": _step_callback(on_step, settings.steps)}),
        )
    return result.images[0]


def _step_callback(on_step, total: int):
    def callback(pipe, step, timestep, kwargs):
        on_step(step + 1, total)
        return kwargs

    return callback


def _a1111_value(value: str) -> str:
    """Quote a value the way A1111 does when it would break the ``key: value, ...`` list."""
    return json.dumps(value) if any(c in value for c in ',:\n"') else value


#: lorasynth scheduler name -> the sampler name A1111 writes in its infotext (and reads back).
A1111_SAMPLERS = {"dpm": "DPM++ 2M", "euler": "Euler", "lcm": "LCM", "ddim": "DDIM"}


def format_parameters(settings: GenerationSettings, extra: dict[str, str] | None = None,
                      loras: list[tuple[str, float]] | None = None) -> str:
    """The A1111 infotext ("parameters"): prompt, negative prompt, then ``Key: value`` pairs.

    The sampler is written under A1111's name (``DPM++ 2M``, ``Euler``...). ``loras``
    (``[(name, scale)]``) are appended to the prompt as A1111's ``<lora:name:scale>`` tags, so
    pasting the text into A1111 applies them; ``extra`` items (e.g. ``Model hash``,
    ``Lora hashes``) are appended as given.
    """
    prompt = settings.prompt + "".join(f" <lora:{name}:{scale:g}>" for name, scale in loras or [])
    lines = [prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    pairs = {
        "Steps": str(settings.steps),
        "Sampler": A1111_SAMPLERS.get(settings.scheduler, settings.scheduler),
        "CFG scale": f"{settings.guidance:g}",
        "Seed": str(settings.seed),
        "Size": f"{settings.width}x{settings.height}",
        "Dtype": settings.dtype,
        **(extra or {}),
    }
    lines.append(", ".join(f"{k}: {_a1111_value(str(v))}" for k, v in pairs.items()))
    return "\n".join(lines)


def save_png(image, path: str | Path, settings: GenerationSettings, extra: dict[str, str] | None = None,
             loras: list[tuple[str, float]] | None = None) -> Path:
    """Write ``image`` as PNG with its settings in the metadata, atomically.

    Two text chunks: ``parameters`` (A1111 format, read by most SD tools) and ``lorasynth``
    (JSON: ``{"lorasynth_version", "settings", "extra"}``, read back by :func:`read_png_metadata`).
    The file is written to a temporary name in the same folder and renamed, so readers never
    see a half-written PNG.
    """
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    info.add_text("parameters", format_parameters(settings, extra, loras))
    payload = {"lorasynth_version": __version__, "settings": dataclasses.asdict(settings), "extra": dict(extra or {})}
    info.add_text("lorasynth", json.dumps(payload, ensure_ascii=False))
    from lorasynth.core.safe_io import atomic_write

    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def read_png_metadata(path: str | Path) -> tuple[GenerationSettings, dict[str, str]]:
    """Read back the settings and ``extra`` that :func:`save_png` stored in a PNG.

    Raises:
        LorasynthError: the file is not a PNG written by lorasynth.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            raw = im.text.get("lorasynth") if hasattr(im, "text") else None
    except OSError as exc:
        raise LorasynthError(f"cannot read {path}: {exc}") from exc
    if raw is None:
        raise LorasynthError(f"{path} has no lorasynth metadata")
    try:
        payload = parse_json(raw, f"{path}: lorasynth metadata", error=LorasynthError)
        return GenerationSettings(**payload["settings"]), dict(payload.get("extra", {}))
    except (ValueError, KeyError, TypeError) as exc:
        raise LorasynthError(f"{path} has corrupt lorasynth metadata: {exc}") from exc
