"""Benchmark: LoRA file -> fused weights, lorasynth vs diffusers, on the real SD1.5 UNet shape.

Weight values do not change speed, so the UNet has the real SD1.5 config and random
weights (no download). Prints one JSON object with, for each LoRA kind (a rank-1 w2w
to_q/to_v LoRA and a rank-8 LoRA on every attention projection):

* file -> fused seconds for lorasynth (``load_lora`` + ``fuse``) and for diffusers
  (``load_lora_weights`` + ``fuse_lora``), median of repeats, and their ratio; lorasynth's
  first fuse on a pipeline is listed apart (it allocates the scratch memory later fuses reuse);
* unfuse seconds and the max abs restore error in fp32 and bf16 for both;
* blend time of 10 LoRAs, exact and at rank 16.

Everything runs at 1 torch thread and at all cores (torch's default), in the same run: fusing
is memory-bound and scales with cores, diffusers' path is mostly Python and does not.

    python scripts/bench_apply.py [--repeats 5] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_pipeline(tmp: Path):
    """SD1.5-shaped UNet (random weights) inside a pipeline with tiny VAE/text encoder."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from lorasynth.runtime.pipeline import load_pipeline
    from lorasynth.worlds.tiny_sd import build_sd_pipeline

    tiny = load_pipeline(str(build_sd_pipeline(tmp / "tiny", "tiny")), dtype="fp32", channels_last=False)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=unet,
        scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def make_lora_file(tmp: Path, kind: str) -> Path:
    from lorasynth.formats import save_lora
    from lorasynth.core.layout import Layout
    from lorasynth.core.sd15 import sd15_module_shapes

    if kind == "w2w_rank1":
        layout = Layout.w2w()
        alpha = 27.0
    else:
        targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
        layout = Layout.for_targets(sd15_module_shapes(), targets, rank=8)
        alpha = 8.0
    g = torch.Generator().manual_seed(1)
    lora = layout.unflatten(torch.randn(layout.size, generator=g) * 0.01, alpha=alpha)
    return save_lora(lora, tmp / f"{kind}.safetensors")


def unet_weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items() if "lora" not in k}


def max_restore_error(pipe, before) -> float:
    after = pipe.unet.state_dict()
    return max((after[k].float() - v.float()).abs().max().item() for k, v in before.items())


def bench_kind(pipe, path: Path, repeats: int) -> dict:
    from lorasynth.runtime.apply import fuse
    from lorasynth.formats import load_lora

    out: dict = {"file": path.name, "file_mb": round(path.stat().st_size / 2**20, 2)}
    for dtype in (torch.float32, torch.bfloat16):
        pipe.unet.to(dtype)
        before = unet_weights(pipe)
        ours_fuse, ours_unfuse, theirs_fuse, theirs_unfuse = [], [], [], []
        ours_err = theirs_err = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            handle = fuse(pipe, [(load_lora(path), 1.0)])
            t1 = time.perf_counter()
            handle.restore()
            t2 = time.perf_counter()
            ours_fuse.append(t1 - t0)
            ours_unfuse.append(t2 - t1)
            ours_err = max(ours_err, max_restore_error(pipe, before))

            t0 = time.perf_counter()
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="bench")
            pipe.fuse_lora(lora_scale=1.0)
            t1 = time.perf_counter()
            pipe.unfuse_lora()
            t2 = time.perf_counter()
            pipe.unload_lora_weights()
            theirs_fuse.append(t1 - t0)
            theirs_unfuse.append(t2 - t1)
            theirs_err = max(theirs_err, max_restore_error(pipe, before))
            # start the next round from the exact original weights
            pipe.unet.load_state_dict(before, strict=False)
        name = "fp32" if dtype == torch.float32 else "bf16"
        med = statistics.median
        out[name] = {
            "lorasynth_file_to_fused_s": med(ours_fuse),
            "lorasynth_first_fuse_s": ours_fuse[0],  # before its scratch memory exists (see apply.py)
            "diffusers_file_to_fused_s": med(theirs_fuse),
            "ratio_lorasynth_over_diffusers": med(ours_fuse) / med(theirs_fuse),
            "lorasynth_unfuse_s": med(ours_unfuse),
            "diffusers_unfuse_s": med(theirs_unfuse),
            "lorasynth_restore_max_abs_error": ours_err,
            "diffusers_restore_max_abs_error": theirs_err,
        }
    pipe.unet.to(torch.float32)
    return out


def bench_blend(path: Path, repeats: int) -> dict:
    from lorasynth.core.blending import blend
    from lorasynth.formats import load_lora

    base = load_lora(path)
    loras = []
    for i in range(10):
        g = torch.Generator().manual_seed(100 + i)
        loras.append(type(base)({n: type(m)(torch.randn(m.down.shape, generator=g), torch.randn(m.up.shape, generator=g), m.alpha)
                                 for n, m in base.modules.items()}))
    weights = [1.0 / 10] * 10
    exact, ranked = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        blend(loras, weights)
        t1 = time.perf_counter()
        _, report = blend(loras, weights, rank=16)
        t2 = time.perf_counter()
        exact.append(t1 - t0)
        ranked.append(t2 - t1)
    return {
        "inputs": f"10 x {path.name}",
        "exact_s": statistics.median(exact),
        "rank16_s": statistics.median(ranked),
        "rank16_overall_relative_error": report.overall_error,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                    help="torch thread counts to run both libraries at (default: 1 and all cores)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    import diffusers

    from lorasynth.formats.keys import sd15_tree

    sd15_tree()  # warm the shipped module table once, as any long-running process would
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        pipe = build_pipeline(tmp)
        build_s = time.perf_counter() - t0
        files = {kind: make_lora_file(tmp, kind) for kind in ("w2w_rank1", "attention_rank8")}
        result = {
            "benchmark": "apply",
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
                        "platform": platform.platform(), "load_average_start": os.getloadavg()},
            "unet": "SD1.5 config, random weights, %d params" % sum(p.numel() for p in pipe.unet.parameters()),
            "unet_build_s": build_s,
            "repeats": args.repeats,
        }
        for threads in args.threads:
            torch.set_num_threads(threads)
            result[f"threads_{threads}"] = {
                "lora": {kind: bench_kind(pipe, path, args.repeats) for kind, path in files.items()},
                "blend": bench_blend(files["attention_rank8"], max(1, args.repeats // 2)),
            }
    result["machine"]["load_average_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
