"""``train latent|hypernet`` (``train vae``: a deprecated name of ``train latent``), ``synthesize``,
``export-model``, ``sample``, ``edit``, ``interpolate``, ``eval``.

Each command's parser (``add_<command>(sub)``) sits right above its handler
(``cmd_<command>(args)``); :func:`register` only calls the ``add_`` functions. Handlers import
what they need, so ``lorasynth --help`` imports no torch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lorasynth.core.numbers import float_arg, int_arg, is_id_text, parse_int
from lorasynth.errors import LorasynthError
from lorasynth.apps.cli.helpfmt import examples
from lorasynth.apps.cli.threads import restores_threads, threads_flag, use_threads

LATENT_KINDS = ("pca", "vae")  # lorasynth.training.model_parts.train_latent; the first is the default


def register(sub) -> None:
    tsub = add_train(sub)
    add_train_latent(tsub)
    add_train_hypernet(tsub)
    add_train_vae(tsub)
    add_synthesize(sub)
    add_export_model(sub)
    add_sample(sub)
    add_edit(sub)
    add_interpolate(sub)
    add_eval(sub)


# ---------------------------------------------------------------------------- shared flags

def _trainer_flags(p, steps: int, batch: int, lr: float) -> None:
    g = p.add_argument_group("training (Lightning)")
    g.add_argument("--steps", type=int_arg(1), default=steps, help="optimizer steps")
    g.add_argument("--batch-size", type=int_arg(1), default=batch, help="items per step (per device)")
    g.add_argument("--lr", type=float_arg(above=0), default=lr, help="peak learning rate (warm-up, then cosine decay)")
    g.add_argument("--seed", type=int_arg(0), default=0, help="random seed (split, initialization, batches)")
    g.add_argument("--devices", default="auto", help="Lightning devices (e.g. 1, 4, auto)")
    g.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    g.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    g.add_argument("--num-nodes", type=int_arg(1), default=1, help="Lightning nodes (multi-node DDP)")
    g.add_argument("--precision", default="32-true", help="e.g. 32-true, bf16-mixed")
    g.add_argument("--resume", action="store_true", help="continue from the part's last.ckpt")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args):
    from lorasynth.training.lightning import TrainConfig, check_precision

    devices = parse_int(args.devices, "--devices", minimum=1, maximum=4096) if is_id_text(str(args.devices)) \
        else args.devices
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, devices=devices,
                      accelerator=args.accelerator, strategy=args.strategy, num_nodes=args.num_nodes,
                      precision=args.precision, progress=not args.no_progress)
    check_precision(cfg)  # before any folder is made
    return cfg


def _synthesis_flags(p) -> None:
    p.add_argument("--model", required=True, help="model folder made by `lorasynth train`, or a Hugging Face hub id org/name")
    p.add_argument("--pack", default=None, help="override the pack path recorded in the model")
    p.add_argument("--guidance", type=float_arg(), default=None, help="classifier-free guidance (default: the model's)")
    p.add_argument("--steps", type=int_arg(None, None), default=None, help="sampler steps (default: the model's)")
    p.add_argument("--seed", type=int_arg(None, None), default=0, help="random seed (same seed, same LoRA)")


# ---------------------------------------------------------------------------- training

def add_train(sub):
    """The ``train`` group; returns its subparsers for the parts."""
    train = sub.add_parser("train", help="train a synthesis model: latent (PCA, or a VAE), then hypernet",
                           description="Train a synthesis model folder in two parts: `train latent` (the latent "
                                       "model: PCA by default, or a LoRA-VAE with --kind vae; on a pack or library), "
                                       "then `train hypernet` (the conditional diffusion from face embeddings to "
                                       "latents). `train vae` is a deprecated name of `train latent`.",
                           epilog=examples("lorasynth train latent --library lib --out model",
                                           "lorasynth train hypernet --model model"))
    train.set_defaults(func=lambda args: (train.print_help(), 2)[1])
    return train.add_subparsers(dest="train_command", metavar="PART")


def _latent_arguments(p) -> None:
    """The options of ``train latent`` (and of its deprecated name ``train vae``)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pack", help="a pack folder (lorasynth library pack)")
    src.add_argument("--library", help="a library folder (packed into MODEL/pack first)")
    p.add_argument("--out", required=True, metavar="MODEL", help="model folder to create (or --resume)")
    p.add_argument("--kind", choices=LATENT_KINDS, default=LATENT_KINDS[0],
                   help="latent model: pca, or vae (a LoRA-VAE, trained with the 'training' options; it also "
                        "reports PCA's reconstruction at the same size). PCA reconstructs held-out LoRAs better than "
                        "the VAE at equal size on every planted world measured")
    p.add_argument("--latent-dim", type=int_arg(1, 65536), default=512, help="latent size")
    p.add_argument("--holdout", type=float_arg(0, 0.9), default=0.1, help="fraction of persons kept out for `lorasynth eval` (test)")
    p.add_argument("--validation", type=float_arg(0, 0.9), default=0.1,
                   help="fraction of persons kept for choosing settings (kernel, sampler); never trained on")
    _trainer_flags(p, steps=3000, batch=64, lr=1e-3)


LATENT_DESCRIPTION = ("Create a model folder and fit its latent model on a pack or a library: PCA by default, or a "
                      "LoRA-VAE with --kind vae (trained with Lightning; checkpoints go to MODEL/train/vae, --resume "
                      "continues). A fraction of the identities is held out for `lorasynth eval`.")


def add_train_latent(tsub) -> None:
    p = tsub.add_parser("latent", help="train the latent model (PCA by default, or --kind vae) on a pack or library",
                        description=LATENT_DESCRIPTION,
                        epilog=examples("lorasynth train latent --library lib --out model",
                                        "lorasynth train latent --pack pack --out model --latent-dim 256",
                                        "lorasynth train latent --library lib --out model --kind vae --accelerator gpu "
                                        "--devices 4 --strategy ddp --precision bf16-mixed"))
    _latent_arguments(p)
    p.set_defaults(func=cmd_train_latent)


def cmd_train_latent(args) -> int:
    from lorasynth.training.model_parts import train_latent
    from lorasynth.library.pack import META_FILE as PACK_META, open_pack
    from lorasynth.models.model_folder import MODEL_FILE, SynthesisModel
    from lorasynth.training.lightning import is_global_zero

    train_cfg = _train_config(args)
    out = Path(args.out)
    rank0 = is_global_zero()  # under DDP every rank runs this command; rank 0 alone writes
    if args.resume and (out / MODEL_FILE).exists():
        model = SynthesisModel.open(out)
    else:
        if args.library:
            pack_dir = out / "pack"
            if rank0:
                from lorasynth.library.packing import pack_library
                from lorasynth.library.store import Library

                print(pack_library(Library.open(args.library), pack_dir, progress=not args.no_progress).summary())
            elif not (pack_dir / PACK_META).is_file():
                raise LorasynthError(f"{pack_dir} is not packed yet: when all ranks start together (torchrun, SLURM, "
                                     "--num-nodes), run `lorasynth library pack` first and train with --pack")
            pack = open_pack(pack_dir)
        else:
            pack = open_pack(args.pack)
        model = SynthesisModel.create(out, pack, heldout_frac=args.holdout, seed=args.seed, val_frac=args.validation,
                                      save=rank0)
    t0 = time.perf_counter()
    latent = train_latent(model, args.kind, args.latent_dim, train_cfg, resume=args.resume)
    if not is_global_zero():
        return 0
    params = sum(p.numel() for p in latent.parameters()) if hasattr(latent, "parameters") else latent.latent_dim * latent.dim
    print(f"trained {args.kind} (latent {latent.latent_dim}, {params:,} parameters) in {time.perf_counter() - t0:.1f}s "
          f"-> {model.latent_dir}")
    cmp = getattr(latent, "comparison", None)
    if cmp:
        vae, pca = cmp["vae_reconstruction_delta_cosine"], cmp["pca_reconstruction_delta_cosine"]
        print(f"validation reconstruction (delta-W cosine, {cmp['validation_rows']} rows): VAE {vae:.4f}, "
              f"PCA at k={cmp['pca_latent_dim']} {pca:.4f}")
        if cmp.get("residual_used") is False:
            print("the VAE's nonlinear residual did not beat PCA on the validation people: this VAE is its PCA "
                  "linear path (the PCA of its size)")
        elif pca > vae:
            print("PCA reconstructs better than this VAE: retrain with `--kind pca` (the default) for a better model")
    return 0


def add_train_vae(tsub) -> None:
    """``train vae``: the old name of ``train latent``, kept working (deprecated)."""
    p = tsub.add_parser("vae", help="deprecated name of `train latent` (same options)",
                        description="Deprecated: use `lorasynth train latent` (same options, same result). "
                                    + LATENT_DESCRIPTION,
                        epilog=examples("lorasynth train vae --library lib --out model   "
                                        "# now: lorasynth train latent --library lib --out model"))
    _latent_arguments(p)
    p.set_defaults(func=cmd_train_vae)


def cmd_train_vae(args) -> int:
    from lorasynth.training.lightning import is_global_zero

    if is_global_zero():  # under DDP every rank runs the command: say it once
        print("lorasynth: `train vae` is deprecated: use `lorasynth train latent` (same options)", file=sys.stderr)
    return cmd_train_latent(args)


def add_train_hypernet(tsub) -> None:
    p = tsub.add_parser("hypernet", help="train the diffusion hypernetwork on a model's latents",
                        description="Encode the model's training LoRAs with its latent model, fit the closed-form "
                                    "kernel-ridge mean (face embedding -> latent) and train the residual diffusion; "
                                    "sampler settings are calibrated on the validation persons. Exported to "
                                    "MODEL/hypernet, checkpoints in MODEL/train/hypernet.",
                        epilog=examples("lorasynth train hypernet --model model",
                                        "lorasynth train hypernet --model model --steps 4000 --resume"))
    p.add_argument("--model", required=True, metavar="MODEL", help="model folder with a trained latent model")
    p.add_argument("--width", type=int_arg(1, 65536), default=None, help="denoiser width (default: the hypernetwork config's)")
    p.add_argument("--depth", type=int_arg(1, 1024), default=None, help="denoiser blocks (default: the hypernetwork config's)")
    p.add_argument("--prediction", choices=["x0", "v", "eps"], default=None,
                   help="what the denoiser predicts (default: the hypernetwork config's)")
    _trainer_flags(p, steps=2000, batch=256, lr=2e-3)  # what scripts/bench_quality.py measures
    p.set_defaults(func=cmd_train_hypernet)


def cmd_train_hypernet(args) -> int:
    from lorasynth.training.model_parts import train_hypernet
    from lorasynth.models.model_folder import SynthesisModel
    from lorasynth.training.lightning import is_global_zero

    model = SynthesisModel.open(args.model)
    overrides = {k: v for k, v in (("width", args.width), ("depth", args.depth), ("prediction", args.prediction)) if v}
    t0 = time.perf_counter()
    net = train_hypernet(model, _train_config(args), overrides, resume=args.resume)
    if not is_global_zero():
        return 0
    params = sum(p.numel() for p in net.net.parameters())
    print(f"trained hypernetwork ({params:,} parameters) in {time.perf_counter() - t0:.1f}s -> {model.hypernet_dir}")
    for note in getattr(net, "notes", []):  # a calibration that fell back, a default other than one sample
        print(f"note: {note}")
    return 0


# ---------------------------------------------------------------------------- synthesis

def _settings(args, strategy: str):
    from lorasynth.synthesis.synthesizer import SynthesisSettings

    return SynthesisSettings(strategy=strategy, guidance=args.guidance, steps=args.steps, seed=args.seed,
                             samples=getattr(args, "samples", 1), k=getattr(args, "k", None),
                             average=getattr(args, "average", False),
                             average_rank=getattr(args, "average_rank", 32),
                             temperature=getattr(args, "temperature", None))


def _numbered(path: Path, i: int, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}_{i}{path.suffix}")


def _prewarm_embedder(model: str, model_root: str | None) -> None:
    """Build the model's face embedder in a background thread, while this one imports torch and
    opens the model: dlib's HOG detector alone takes about a third of a torch import to build, and
    it overlaps. Failures are left for the foreground to report."""
    import threading

    def work() -> None:
        try:
            from lorasynth.core.safe_io import read_json

            info = read_json(Path(model) / "lorasynth_model.json")
            if info.get("embedder") in ("dlib", "arcface"):
                from lorasynth.faces import get_embedder

                get_embedder(info["embedder"], model_root=model_root)
        except Exception:  # noqa: BLE001 - the foreground reports the same problem properly
            pass

    if Path(model).is_dir():
        threading.Thread(target=work, name="lorasynth-prewarm", daemon=True).start()


def add_synthesize(sub) -> None:
    p = sub.add_parser("synthesize", help="synthesize a LoRA from one face photo (no training)",
                       description="Write a LoRA of the person in a face photo (or a face embedding) with a trained "
                                   "model: no training at synthesis time. The file carries its provenance "
                                   "(strategy, seed, model hash) in its metadata.",
                       epilog=examples("lorasynth synthesize --face me.jpg --model model -o me.safetensors",
                                       "lorasynth synthesize --face me.jpg --model org/w2w-dlib --seed 3 -o me.safetensors",
                                       "lorasynth synthesize --embedding me.npy --model model --strategy blend "
                                       "-o me_blend.safetensors"))
    face = p.add_mutually_exclusive_group(required=True)
    face.add_argument("--face", metavar="PHOTO", help="face photo")
    face.add_argument("--embedding", help=".npy face embedding (float32, 1-D)")
    _synthesis_flags(p)
    p.add_argument("--strategy", choices=["auto", "diffusion", "blend", "nearest"], default="auto",
                   help="diffusion: one sample of the hypernetwork; blend: top-k library LoRAs; nearest: the closest "
                        "library LoRA; auto (default): the model's default, one sample unless `train hypernet` "
                        "found a better strategy on validation people (it says so)")
    p.add_argument("--samples", type=int_arg(None, None), default=1, help="how many LoRAs (diffusion): OUT gets _0, _1... suffixes")
    p.add_argument("--average", action="store_true",
                   help="write ONE LoRA for fidelity: the model's expected delta W for the face (closed form, "
                        "the limit of averaging many samples); with --samples N the exact mean of N samples. "
                        "Without it: samples, for variety (pick the best-looking)")
    p.add_argument("--average-rank", type=int_arg(None, None), default=32,
                   help="rank of the --average LoRA (optimal truncation; its error is in the metadata)")
    p.add_argument("--k", type=int_arg(None, None), default=None, help="blend: neighbours (default: the model's, chosen on validation; else 8)")
    p.add_argument("--temperature", type=float_arg(), default=None,
                   help="blend: softmax temperature (default: the model's, chosen on validation; else 0.05)")
    p.add_argument("--face-index", type=int_arg(0, 1000), default=None, help="which face (0 = largest)")
    p.add_argument("--model-root", default=None, help="insightface model root (arcface models)")
    p.add_argument("--to", choices=["kohya", "diffusers"], default="kohya", help="layout of OUT")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="LoRA file to write")
    threads_flag(p)
    p.set_defaults(func=cmd_synthesize)


@restores_threads
def cmd_synthesize(args) -> int:
    if args.face:  # first: the formats and settings checks below import torch, which the prewarm overlaps
        _prewarm_embedder(args.model, args.model_root)
    from lorasynth.core.safe_io import check_output_path

    check_output_path(args.output)  # an unwritable -o or a bad embedding fails before any work
    _settings(args, args.strategy).validate()
    use_threads(args)

    from lorasynth.synthesis.synthesizer import Synthesizer, write_synthesized

    t0 = time.perf_counter()
    if not args.face:
        from lorasynth.faces.embeddings import read_embedding_npy

        embedding = read_embedding_npy(args.embedding, "embedding")
        source = Path(args.embedding).name
    syn = Synthesizer.from_pretrained(args.model, pack=args.pack, model_root=args.model_root)
    if args.face:
        embedding, selection = syn.embed_photo(args.face, args.face_index)
        print(selection.describe())
        source = Path(args.face).name
    t1 = time.perf_counter()
    results = syn.synthesize(embedding, _settings(args, args.strategy), source=source)
    out = Path(args.output)
    for i, r in enumerate(results):
        path = write_synthesized(r, _numbered(out, i, len(results)), args.to)
        print(f"wrote {path} ({r.provenance.get('lorasynth.strategy', args.strategy)}, {len(r.lora)} modules)")
    print(f"embedding {t1 - t0:.2f}s, synthesis+write {time.perf_counter() - t1:.2f}s")
    return 0


def add_export_model(sub) -> None:
    p = sub.add_parser("export-model", help="write a shareable copy of a model: a hub repository with a model card",
                       description="Copy a model folder's weights and config (with the SHA-256 of every file) into a "
                                   "new folder with a model card README.md, ready to upload to the Hugging Face hub; "
                                   "training checkpoints stay behind.",
                       epilog=examples("lorasynth export-model model share/w2w-dlib --license mit",
                                       "huggingface-cli upload org/w2w-dlib share/w2w-dlib"))
    p.add_argument("model", metavar="MODEL", help="model folder made by `lorasynth train`")
    p.add_argument("out", metavar="OUT", help="new (or empty) folder to write")
    p.add_argument("--include-pack", action="store_true",
                   help="also copy the training pack (large; needed by the nearest/blend strategies)")
    p.add_argument("--base-model", default=None, help="base model recorded in the card (default: the SD1.5 hub id)")
    p.add_argument("--license", default="other", help="license recorded in the card")
    p.set_defaults(func=cmd_export_model)


def cmd_export_model(args) -> int:
    from lorasynth.models.model_folder import SynthesisModel

    out = SynthesisModel.open(args.model).save_pretrained(args.out, include_pack=args.include_pack,
                                                          base_model=args.base_model, license=args.license)
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample new identities (unconditional)",
                       description="Write LoRAs of new, made-up identities: the hypernetwork sampled without a face "
                                   "condition.",
                       epilog=examples("lorasynth sample --model model -n 4 -o new_people/"))
    _synthesis_flags(p)
    p.add_argument("-n", type=int_arg(1, 256), default=4, help="how many LoRAs")
    p.add_argument("-o", "--out-dir", required=True, metavar="DIR", help="folder for sample_SEED_I.safetensors")
    threads_flag(p)
    p.set_defaults(func=cmd_sample)


@restores_threads
def cmd_sample(args) -> int:
    from lorasynth.synthesis.synthesizer import Synthesizer, SynthesisSettings, write_synthesized

    use_threads(args)

    syn = Synthesizer.from_pretrained(args.model, pack=args.pack)
    s = SynthesisSettings(strategy="sample", guidance=args.guidance, steps=args.steps, seed=args.seed, samples=args.n)
    out = Path(args.out_dir)
    for i, r in enumerate(syn.synthesize(None, s)):
        print(f"wrote {write_synthesized(r, out / f'sample_{args.seed}_{i}.safetensors')}")
    return 0


def _encode_lora(syn, path: str):
    import torch

    from lorasynth.formats import ModuleTree, load_lora

    vec = syn.layout.flatten(load_lora(path, tree=ModuleTree.from_specs(syn.layout.modules)), canonical=True)
    with torch.no_grad():
        return syn.latent.encode(syn.latent.standardize(vec[None].numpy()))


def _write_latent(syn, z, path: str, meta: dict) -> None:
    import torch

    from lorasynth.formats import save_lora

    lora = syn.layout.unflatten(torch.from_numpy(syn.decode(z)[0]))
    lora.metadata.update({k: str(v) for k, v in meta.items()})
    print(f"wrote {save_lora(lora, path)}")


def add_interpolate(sub) -> None:
    p = sub.add_parser("interpolate", help="interpolate two LoRAs in the latent space",
                       description="Encode two LoRAs into the model's latent space and decode the point (1-t)*A + t*B.",
                       epilog=examples("lorasynth interpolate alice.safetensors bob.safetensors --model model --t 0.3 "
                                       "-o mix.safetensors"))
    p.add_argument("a", metavar="LORA_A", help="first LoRA (t = 0)")
    p.add_argument("b", metavar="LORA_B", help="second LoRA (t = 1)")
    p.add_argument("--model", required=True, metavar="MODEL", help="model folder or hub id")
    p.add_argument("--t", type=float_arg(-100, 100), default=0.5, help="position between A (0) and B (1)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="LoRA file to write")
    p.set_defaults(func=cmd_interpolate)


def cmd_interpolate(args) -> int:
    from lorasynth.synthesis.synthesizer import Synthesizer

    syn = Synthesizer.from_pretrained(args.model)
    za, zb = _encode_lora(syn, args.a), _encode_lora(syn, args.b)
    _write_latent(syn, (1 - args.t) * za + args.t * zb, args.output,
                  {"lorasynth.interpolate": json.dumps([Path(args.a).name, Path(args.b).name, args.t])})
    return 0


def add_edit(sub) -> None:
    p = sub.add_parser("edit", help="move a LoRA along a latent attribute direction (w2w-style regression)",
                       description="Encode a LoRA into the model's latent space, move it along the direction that "
                                   "predicts a library attribute (least squares, as in weights2weights) and decode.",
                       epilog=examples("lorasynth edit me.safetensors --model model --library lib --attribute Male "
                                       "--strength -1 -o me_edit.safetensors"))
    p.add_argument("lora", metavar="LORA_FILE", help="LoRA to edit (the model's layout)")
    p.add_argument("--model", required=True, metavar="MODEL", help="model folder or hub id")
    p.add_argument("--library", required=True, help="library whose entry attributes define the direction")
    p.add_argument("--attribute", required=True, help="attribute name in the library entries (e.g. Male, Young)")
    p.add_argument("--strength", type=float_arg(-1000, 1000), default=1.0, help="in standard deviations of the attribute score")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="LoRA file to write")
    p.set_defaults(func=cmd_edit)


def cmd_edit(args) -> int:
    import torch

    from lorasynth.synthesis.editing import attribute_direction
    from lorasynth.library.store import Library
    from lorasynth.synthesis.synthesizer import Synthesizer

    syn = Synthesizer.from_pretrained(args.model)
    direction, score_std = attribute_direction(syn, Library.open(args.library), args.attribute)
    z = _encode_lora(syn, args.lora)
    z2 = z + args.strength * score_std * torch.from_numpy(direction).float()[None]
    _write_latent(syn, z2, args.output, {"lorasynth.edit": json.dumps([args.attribute, args.strength])})
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out evaluation: delta-W cosine per strategy, latent reconstruction",
                       description="Synthesize a LoRA for every held-out identity of the model with each strategy and "
                                   "compare it with the true one (delta-W cosine, relative error); also the latent "
                                   "model's reconstruction. Writes eval.json and eval.png.",
                       epilog=examples("lorasynth eval --model model",
                                       "lorasynth eval --model model --base ./sd15 --faces photos/ --max-items 20"))
    _synthesis_flags(p)
    p.add_argument("--out", default=None, help="folder for eval.json and eval.png (default MODEL/eval)")
    p.add_argument("--strategies", default="diffusion,blend,nearest", help="comma list of strategies to compare")
    p.add_argument("--max-items", type=int_arg(1), default=None, help="evaluate at most this many held-out identities")
    p.add_argument("--base", default=None, help="with --faces: identity similarity on generated images")
    p.add_argument("--faces", default=None, help="folder of face photos for the identity metric")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from lorasynth.synthesis.evaluation import evaluate, identity_similarity, save_report
    from lorasynth.synthesis.synthesizer import Synthesizer

    syn = Synthesizer.from_pretrained(args.model, pack=args.pack)
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    results = evaluate(syn, strategies, args.max_items, _settings(args, "diffusion"))
    if args.faces:
        if not args.base:
            raise LorasynthError("--faces needs --base (the SD pipeline to generate with)")
        results["identity_similarity"] = identity_similarity(syn, args.base, args.faces, strategies)
    json_path, png = save_report(results, args.out or Path(args.model) / "eval")
    for name, r in results["strategies"].items():
        print(f"{name:10s} held-out delta-W cosine {r['delta_cosine_mean']:.4f}  relative error {r['relative_error_mean']:.4f}")
    lat = results["latent"]
    print(f"latent {lat['kind']} reconstruction cosine {lat['reconstruction_delta_cosine']:.4f}"
          + (f" (PCA at k={lat['pca_latent_dim']}: {lat['pca_reconstruction_delta_cosine']:.4f})" if "pca_latent_dim" in lat else ""))
    print(f"wrote {json_path} and {png}")
    return 0
