"""``demo``: the embedded default run (what ``make demo`` runs)."""

from __future__ import annotations


def register(sub) -> None:
    from lorasynth.apps.cli.helpfmt import examples
    from lorasynth.core.numbers import int_arg

    p = sub.add_parser("demo", help="run the whole mission offline on a small random-weight model, write a report",
                       description="Build a small SD1.5-architecture model with random weights, a LoRA library, train "
                                   "the LoRA-VAE and the hypernetwork, synthesize LoRAs from a photo with every "
                                   "strategy, generate previews and write report.md: all offline, on CPU.",
                       epilog=examples("lorasynth demo", "lorasynth demo --out /tmp/demo --smoke"))
    p.add_argument("--out", default="demo_out", help="output folder (LoRA files, previews, eval, report.md)")
    p.add_argument("--cache", default=None, help="cache folder (default ~/.cache/lorasynth/demo or $LORASYNTH_CACHE)")
    p.add_argument("--smoke", action="store_true", help="a much smaller run (for tests)")
    p.add_argument("--identities", type=int_arg(1, 100_000), default=None, help="planted identities in the library")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import dataclasses

    import torch

    from lorasynth.apps.demo import SMOKE, DemoConfig, run_demo

    # one thread: the demo's models are small, and two threads collapse (10x slower) as soon as
    # anything else runs on a 2-core machine; one thread keeps the run time predictable.
    torch.set_num_threads(1)
    cfg = SMOKE if args.smoke else DemoConfig()
    if args.identities:
        cfg = dataclasses.replace(cfg, identities=args.identities)
    run_demo(args.out, cfg, args.cache)
    return 0
