"""``--threads`` for the quick torch commands (``synthesize``, ``sample``, ``embed``).

Usage in a command module::

    def add_thing(sub):
        p = sub.add_parser("thing", ...)
        threads_flag(p)
        p.set_defaults(func=cmd_thing)

    @restores_threads
    def cmd_thing(args):
        ...            # cheap checks first (and any prewarm thread)
        use_threads(args)  # imports torch
        ...

Light on purpose: importing this module imports nothing but the standard library.
"""

from __future__ import annotations

import functools

from lorasynth.core.numbers import int_arg
from lorasynth.errors import LorasynthError


def threads_flag(p) -> None:
    """Add ``--threads`` to the parser ``p``."""
    p.add_argument("--threads", type=int_arg(1, 1024), default=1,
                   help="torch threads per operation: the models are small, so one thread is as fast on an idle "
                        "machine and 10-40x faster on a busy one (two threads contend for cores)")


def use_threads(args) -> None:
    """Set torch's threads to ``--threads`` (imports torch: call it after starting any prewarm);
    :func:`restores_threads` on the command puts the previous count back when it returns."""
    if args.threads < 1:
        raise LorasynthError(f"--threads must be >= 1, got {args.threads}")
    import torch

    args.threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    _skip_exit_gc()  # the commands that take --threads are the quick ones that load torch


def _skip_exit_gc() -> None:
    """Spare the process the garbage collection that Python runs over every object at exit: with
    torch loaded that pass takes ~0.35 s (a fifth of `python -c "import torch"`), for memory the
    OS reclaims anyway. ``gc.freeze()`` as the first exit handler moves all objects out of the
    collector's reach; the other exit handlers and the normal shutdown still run. In-process
    callers of ``main()`` are unaffected until their own exit."""
    import atexit
    import gc

    atexit.unregister(gc.freeze)  # once, however often main() runs in this process
    atexit.register(gc.freeze)


def restores_threads(cmd):
    """A command that calls :func:`use_threads` leaves torch's thread count as it found it
    (matters when ``main()`` runs in-process, e.g. in tests or a notebook)."""

    @functools.wraps(cmd)
    def run(args) -> int:
        try:
            return cmd(args)
        finally:
            before = getattr(args, "threads_before", None)
            if before is not None:
                import torch

                torch.set_num_threads(before)
    return run
