"""``inspect``, ``convert``, ``blend``: commands on LoRA files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lorasynth.core.numbers import float_arg, int_arg, parse_float
from lorasynth.errors import LorasynthError
from lorasynth.apps.cli.helpfmt import examples

# formats the writers offer (lorasynth.formats.SAVE_FORMATS); spelled out so `--help` imports no torch
SAVE_FORMATS = ("kohya", "diffusers", "peft")
ALPHA_HELP = ("alpha of a peft adapter (overrides its adapter_config.json; needed when that file is missing: "
              "weights2weights LoRAs use 27); ignored for kohya/diffusers files, which carry their alphas")


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a LoRA file's format, modules, ranks, alphas, norms",
                       description="Read a LoRA file (kohya, diffusers or peft; never unpickled) and show its format, "
                                   "modules, ranks, alphas, base model, parameter count, update norm and metadata.",
                       epilog=examples("lorasynth inspect me.safetensors", "lorasynth inspect me.safetensors --modules",
                                       "lorasynth inspect me.safetensors --json > me.json"))
    p.add_argument("file", metavar="LORA_FILE", help="the .safetensors LoRA file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--modules", action="store_true", help="list every module")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert a LoRA file between layouts (kohya, diffusers)",
                       description="Read a LoRA file of any supported layout and write it in another; the updates "
                                   "are kept exactly. kohya loads in A1111, ComfyUI and diffusers.",
                       epilog=examples("lorasynth convert pytorch_lora_weights.safetensors me_kohya.safetensors",
                                       "lorasynth convert me.safetensors me_diffusers.safetensors --to diffusers"))
    p.add_argument("input", metavar="INPUT", help="LoRA file to read (any supported layout)")
    p.add_argument("output", metavar="OUTPUT", help="LoRA file to write")
    p.add_argument("--to", choices=SAVE_FORMATS, default="kohya", help="layout of OUTPUT")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("blend", help="weighted sum of LoRAs: FILE=WEIGHT ... (exact, or --rank R)",
                       description="Write the exact weighted sum of the LoRAs' updates (sum of w_i * dW_i; weights "
                                   "may be negative; ranks add up), or its best rank-R approximation with --rank.",
                       epilog=examples("lorasynth blend me.safetensors=0.8 style.safetensors=0.4 -o mix.safetensors",
                                       "lorasynth blend a.safetensors=1 b.safetensors=-0.3 --rank 8 -o ab.safetensors"))
    p.add_argument("items", nargs="+", metavar="FILE=WEIGHT", help="LoRA files with their weights")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="LoRA file to write")
    p.add_argument("--rank", type=int_arg(1), default=None,
                   help="truncate each module to this rank (optimal SVD; default: exact)")
    p.add_argument("--to", choices=SAVE_FORMATS, default="kohya", help="layout of OUT")
    p.set_defaults(func=cmd_blend)
    add_format_options(sub)


def add_format_options(sub) -> None:
    """Options every LoRA-file command shares: ``--alpha`` for peft adapters; peft output notes."""
    for name in ("inspect", "convert", "blend"):
        sub.choices[name].add_argument("--alpha", type=float_arg(above=0), default=None, help=ALPHA_HELP)
        sub.choices[name].add_argument("--base", default=None, metavar="MODEL",
                                       help="check the modules against this base model (a diffusers folder, hub id "
                                            "or .safetensors checkpoint) instead of SD1.5's")
    sub.choices["convert"].epilog = ((sub.choices["convert"].epilog or "") +
                                     "\n--to peft writes OUTPUT as a folder (adapter_model.safetensors + "
                                     "adapter_config.json), or beside OUTPUT if it ends in .safetensors.").strip()


def parse_weighted(item: str, default: float | None = None) -> tuple[str, float]:
    """``path=0.7`` -> (path, 0.7); a bare path gets ``default`` (error when None)."""
    path, sep, weight = item.rpartition("=")
    if not sep:
        if default is None:
            raise LorasynthError(f"expected FILE=WEIGHT, got {item!r}")
        return item, default
    return path, parse_float(weight, f"weight in {item!r}")  # finite here; the range: core.blending.check_weights


def load_reporting(path, base: str | None = None, **kwargs):
    """``load_lora`` printing each FormatWarning as one ``lorasynth: warning:`` line on stderr;
    ``base``: check the modules against that model instead of SD1.5 (``--base``)."""
    import warnings

    from lorasynth.formats import FormatError, FormatWarning, load_lora

    if base is not None:
        from lorasynth.runtime.apply import base_tree

        kwargs["tree"] = base_tree(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FormatWarning)
        try:
            lora = load_lora(path, **kwargs)
        except FormatError as exc:
            if kwargs.get("tree") is None and "another base model" in str(exc):  # checked against SD1.5
                raise FormatError(f"{exc}; --base MODEL checks it against that model") from exc
            raise
    for w in caught:
        if issubclass(w.category, FormatWarning):
            print(f"lorasynth: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return lora


def summarize(lora) -> dict:
    """What the reader inferred from the weights (top-level keys) and, apart, ``file_metadata``:
    the file's own header metadata exactly as stored (nothing lorasynth added)."""
    import torch

    from lorasynth.formats import INFERRED_KEYS

    mods = lora.modules
    fro = sum(m.delta(torch.float32).square().sum().item() for m in mods.values()) ** 0.5
    meta = lora.metadata
    info = {
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
    }
    if "lorasynth.warning" in meta:
        info["warning"] = meta["lorasynth.warning"]
    info["file_metadata"] = {k: v for k, v in meta.items() if k not in INFERRED_KEYS}
    return info


def cmd_inspect(args) -> int:
    import torch

    lora = load_reporting(args.file, base=args.base, alpha=args.alpha)
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
    print("  read from the weights:")
    for key, value in info.items():
        if key not in ("file_metadata", "module_list"):
            print(f"    {key:22s} {value}")
    file_meta = info["file_metadata"]
    print(f"  file metadata ({len(file_meta)} keys):" if file_meta else "  file metadata: none")
    for k, v in file_meta.items():
        v = " ".join(v.split())
        print(f"    {k:22s} {v[:100]}{'...' if len(v) > 100 else ''}")
    for row in info.get("module_list", []):
        print(f"  {row['name']}  r={row['rank']} alpha={row['alpha']:g} |dW|={row['delta_norm']:.4g}")
    return 0


def cmd_convert(args) -> int:
    from lorasynth.formats import save_lora

    lora = load_reporting(args.input, base=args.base, alpha=args.alpha)
    written = save_lora(lora, args.output, args.to)
    print(f"wrote {written} ({args.to}, {len(lora)} modules)")
    return 0


def cmd_blend(args) -> int:
    from lorasynth.core.blending import blend
    from lorasynth.formats import merged_metadata, save_lora

    pairs = [parse_weighted(i) for i in args.items]
    tree = None
    if args.base is not None:
        from lorasynth.runtime.apply import base_tree

        tree = base_tree(args.base)  # built once for every input
    loras = [load_reporting(p, alpha=args.alpha, tree=tree) for p, _ in pairs]
    out, report = blend(loras, [w for _, w in pairs], rank=args.rank)
    out.metadata.update(merged_metadata([(Path(p).name, lora.metadata) for (p, _), lora in zip(pairs, loras)]))
    out.metadata["lorasynth.blend_sources"] = json.dumps([[Path(p).name, w] for p, w in pairs])
    save_lora(out, args.output, args.to)
    ranks = sorted(out.ranks)
    print(f"wrote {args.output} ({args.to}, {len(out)} modules, rank {ranks[0]}..{ranks[-1]})")
    if report.requested_rank is not None:
        print(f"note: --rank {report.requested_rank} capped at {report.rank}, the most these modules can hold")
    if args.rank is not None:
        print(f"rank-{report.rank} relative error: overall {report.overall_error:.3e}, worst module {report.max_error:.3e}")
    return 0
