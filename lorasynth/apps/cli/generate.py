"""``generate``: text-to-image with a base model plus fused LoRAs, PNG with its settings."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lorasynth.core.numbers import float_arg, int_arg
from lorasynth.errors import LorasynthError
from lorasynth.apps.cli.helpfmt import examples
from lorasynth.apps.cli.lora_files import parse_weighted

# lorasynth.runtime.pipeline.SCHEDULERS, spelled out so `--help` imports no diffusers
SCHEDULER_NAMES = ("dpm", "euler", "lcm", "ddim")
#: Defaults of a full generation, and of the few-step path (--lcm-lora; lorasynth.runtime.speed.FEW_STEP)
FULL_STEPS = {"scheduler": "dpm", "steps": 20, "guidance": 7.5}
FEW_STEP = {"scheduler": "lcm", "steps": 4, "guidance": 1.0}


def register(sub) -> None:
    p = sub.add_parser("generate", help="text-to-image on CPU with a base model and LoRAs",
                       description="Generate one image with a Stable Diffusion 1.5 base model and LoRAs fused into its "
                                   "weights (restored exactly afterwards); the PNG records every setting.",
                       epilog=examples('lorasynth generate --base ./sd15 --lora me.safetensors=0.9 '
                                       '--prompt "a photo of sks person" -o me.png',
                                       'lorasynth generate --base ./sd15 --lora me.safetensors --lcm-lora lcm-lora-sdv1-5.safetensors '
                                       '--tiny-vae ./taesd --prompt "a photo of sks person" -o fast.png',
                                       'lorasynth generate --base ./sd15 --dtype fp32 --prompt "a castle" -o reference.png'))
    p.add_argument("--base", required=True, help="local diffusers folder, hub id, or single-file .safetensors")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[=SCALE]",
                   help="LoRA to fuse (repeatable; scale 1 when omitted)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt")
    p.add_argument("--lcm-lora", default=None, metavar="FILE[=SCALE]",
                   help="a distillation LoRA (LCM-LoRA for SD1.5) fused with the --lora files in one exact sum: "
                        "few steps (defaults become --scheduler lcm --steps 4 --guidance 1, no CFG batch)")
    p.add_argument("--tiny-vae", default=None, metavar="DIR",
                   help="decode with this AutoencoderTiny (TAESD) diffusers folder: much faster, rougher")
    p.add_argument("--steps", type=int_arg(1), default=None, help="denoising steps (20; 4 with --lcm-lora)")
    p.add_argument("--guidance", type=float_arg(0, 30), default=None,
                   help="classifier-free guidance scale (7.5; 1 = no CFG batch, the default with --lcm-lora)")
    p.add_argument("--seed", type=int_arg(0), default=0, help="random seed (same seed, same image)")
    p.add_argument("--width", type=int_arg(8), default=512, help="image width in pixels (multiple of 8)")
    p.add_argument("--height", type=int_arg(8), default=512, help="image height in pixels (multiple of 8)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None, help="sampler (dpm; lcm with --lcm-lora)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="weights dtype: auto (default) = bf16 on CPUs with AMX or AVX512-BF16 (~2.5x faster), "
                        "else fp32; fp32 is the reference")
    p.add_argument("--no-channels-last", action="store_true", help="keep the default memory format")
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="image file to write (.png)")
    p.set_defaults(func=cmd_generate)
    add_alpha_argument(p)


def add_alpha_argument(p) -> None:
    from lorasynth.apps.cli.lora_files import ALPHA_HELP

    p.add_argument("--alpha", type=float_arg(above=0), default=None, help=ALPHA_HELP)


def _lora_weights_file(path: str) -> Path:
    p = Path(path)
    return p / "adapter_model.safetensors" if p.is_dir() else p


def infotext_fields(base: str, lora_args: list[tuple[str, float]]) -> tuple[dict[str, str], list[tuple[str, float]]]:
    """A1111's infotext fields for a base model and LoRA files: ``({"Model hash", "Model",
    "Lora hashes", "Lora"}, [(lora name, scale)])``.

    ``Model hash`` is the first 10 digits of the sha256 of a single-file checkpoint (A1111's
    short hash; a diffusers folder or hub id has none); ``Lora hashes`` gives each LoRA's
    A1111 hash (sha256 of the safetensors data section, 12 digits) under the name its
    ``<lora:name:scale>`` tag uses.
    """
    from lorasynth.formats.metadata import lora_file_hash, model_file_hash

    extra: dict[str, str] = {}
    base_path = Path(base)
    if base_path.is_file():
        extra["Model hash"] = model_file_hash(base_path)[:10]
        extra["Model"] = base_path.stem
    else:
        extra["Model"] = base_path.name if base_path.is_dir() else str(base)
    tags = []
    hashes = []
    for path, scale in lora_args:
        weights = _lora_weights_file(path)
        name = Path(path).name if Path(path).is_dir() else weights.stem
        tags.append((name, scale))
        hashes.append(f"{name}: {lora_file_hash(weights)[:12]}")
    if hashes:
        extra["Lora hashes"] = ", ".join(hashes)
        extra["Lora"] = json.dumps([[Path(p).name, s] for p, s in lora_args])
    return extra, tags


def cmd_generate(args) -> int:
    from lorasynth.runtime.apply import fused, pipeline_tree
    from lorasynth.runtime.pipeline import GenerationSettings, generate, load_pipeline, save_png
    from lorasynth.worlds.tiny_sd import read_tiny_marker
    from lorasynth.apps.cli.lora_files import load_reporting

    from lorasynth.runtime.speed import resolve_dtype

    if not args.output.lower().endswith(".png"):
        raise LorasynthError(f"output must be a .png file, got {args.output}")
    preset = FEW_STEP if args.lcm_lora else FULL_STEPS
    settings = GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt,
        steps=preset["steps"] if args.steps is None else args.steps,
        guidance=preset["guidance"] if args.guidance is None else args.guidance,
        seed=args.seed, width=args.width, height=args.height,
        scheduler=args.scheduler or preset["scheduler"], dtype=resolve_dtype(args.dtype),
    )
    settings.validate()
    lora_args = [parse_weighted(item, default=1.0) for item in args.lora]
    distill = [parse_weighted(args.lcm_lora, default=1.0)] if args.lcm_lora else []
    t0 = time.perf_counter()
    pipe = load_pipeline(args.base, dtype=settings.dtype, channels_last=not args.no_channels_last,
                         tiny_vae=args.tiny_vae)
    if Path(args.base).is_dir() and read_tiny_marker(args.base):
        print("note: this base model has random weights (lorasynth test/demo model): images show mechanics, not quality")
    tree = pipeline_tree(pipe)
    # the identity LoRAs and the distillation LoRA are fused as one exact sum of their updates
    loras = [(load_reporting(path, tree=tree, alpha=args.alpha), scale) for path, scale in lora_args]
    loras += [(load_reporting(path, tree=tree), scale) for path, scale in distill]
    lora_args = lora_args + distill
    t1 = time.perf_counter()
    with fused(pipe, loras) as handle:
        t2 = time.perf_counter()
        image = generate(pipe, settings)
    t3 = time.perf_counter()
    extra, tags = infotext_fields(args.base, lora_args)
    save_png(image, args.output, settings, extra, tags)
    print(
        f"wrote {args.output} ({settings.width}x{settings.height}, {settings.steps} steps, seed {settings.seed}); "
        f"load {t1 - t0:.1f}s, fuse {handle.num_layers} layers {t2 - t1:.2f}s, generate {t3 - t2:.1f}s"
    )
    return 0
