"""``inspect``, ``convert``, ``blend``: commands on LoRA files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..blending import blend
from ..errors import LorasynthError
from ..formats import SAVE_FORMATS, load_lora, save_lora


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a LoRA file's format, modules, ranks, alphas, norms")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--modules", action="store_true", help="list every module")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert a LoRA file between layouts (kohya, diffusers)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", choices=SAVE_FORMATS, default="kohya")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("blend", help="weighted sum of LoRAs: FILE=WEIGHT ... (exact, or --rank R)")
    p.add_argument("items", nargs="+", metavar="FILE=WEIGHT")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--rank", type=int, default=None, help="truncate each module to this rank (optimal SVD)")
    p.add_argument("--to", choices=SAVE_FORMATS, default="kohya")
    p.set_defaults(func=cmd_blend)


def parse_weighted(item: str, default: float | None = None) -> tuple[str, float]:
    """``path=0.7`` -> (path, 0.7); a bare path gets ``default`` (error when None)."""
    path, sep, weight = item.rpartition("=")
    if not sep:
        if default is None:
            raise LorasynthError(f"expected FILE=WEIGHT, got {item!r}")
        return item, default
    try:
        return path, float(weight)
    except ValueError:
        raise LorasynthError(f"weight in {item!r} is not a number") from None


def summarize(lora) -> dict:
    mods = lora.modules
    fro = sum(m.delta(torch.float32).square().sum().item() for m in mods.values()) ** 0.5
    meta = lora.metadata
    return {
        "format": meta.get("lorasynth.source_format"),
        "modules": len(mods),
        "components": sorted(lora.components),
        "ranks": sorted(lora.ranks),
        "alphas": sorted({m.alpha for m in mods.values()}),
        "conv_modules": sum(m.is_conv for m in mods.values()),
        "params": lora.num_params,
        "dtype": str(next(iter(mods.values())).down.dtype).replace("torch.", "") if mods else None,
        "base_model_version": meta.get("ss_base_model_version", "unknown (assumed sd_v1)"),
        "delta_frobenius_norm": fro,
        "metadata": {k: v for k, v in meta.items() if k != "lora_adapter_metadata"},
    }


def cmd_inspect(args) -> int:
    lora = load_lora(args.file)
    info = summarize(lora)
    if args.modules or args.json:
        info["module_list"] = [
            {"name": n, "rank": m.rank, "alpha": m.alpha, "down": list(m.down.shape), "up": list(m.up.shape),
             "delta_norm": m.delta(torch.float32).norm().item()}
            for n, m in lora.modules.items()
        ]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.file}")
    for key in ("format", "modules", "components", "ranks", "alphas", "conv_modules", "params", "dtype",
                "base_model_version", "delta_frobenius_norm"):
        print(f"  {key:22s} {info[key]}")
    for k, v in info["metadata"].items():
        print(f"  meta {k:17s} {v[:100]}")
    for row in info.get("module_list", []):
        print(f"  {row['name']}  r={row['rank']} alpha={row['alpha']:g} |dW|={row['delta_norm']:.4g}")
    return 0


def cmd_convert(args) -> int:
    lora = load_lora(args.input)
    save_lora(lora, args.output, args.to)
    print(f"wrote {args.output} ({args.to}, {len(lora)} modules)")
    return 0


def cmd_blend(args) -> int:
    pairs = [parse_weighted(i) for i in args.items]
    loras = [load_lora(p) for p, _ in pairs]
    out, report = blend(loras, [w for _, w in pairs], rank=args.rank)
    out.metadata["lorasynth.blend_sources"] = json.dumps([[Path(p).name, w] for p, w in pairs])
    save_lora(out, args.output, args.to)
    ranks = sorted(out.ranks)
    print(f"wrote {args.output} ({args.to}, {len(out)} modules, rank {ranks[0]}..{ranks[-1]})")
    if args.rank is not None:
        print(f"rank-{args.rank} relative error: overall {report.overall_error:.3e}, worst module {report.max_error:.3e}")
    return 0
