"""``lorasynth library merge``: merge per-worker libraries into one.

    lorasynth library merge LIB worker0/ worker1/ ...

Every entry of the source libraries is added to ``LIB`` with its name, source, attributes
and embeddings; blob checksums stay the same, entries whose tensors ``LIB`` already holds
are reported as duplicates, names taken by other weights as conflicts (exit 1). See
:mod:`lorasynth.library.merge`. Registered into the ``library`` group through
:func:`lorasynth.apps.cli.library.library_subparsers`.
"""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    from lorasynth.apps.cli.library import library_subparsers

    p = library_subparsers(sub).add_parser(
        "merge",
        help="add the entries of other libraries (e.g. one per worker) to a library: checksums kept, duplicates found",
        description="Merge libraries of one base model and layout into LIBDIR: each source entry is hash-checked and "
                    "added with its name, source, attributes and embeddings (same blob checksum). Tensors LIBDIR "
                    "already holds are reported as duplicates; a name used by other weights is a conflict (exit 1).",
        epilog="examples:\n  lorasynth library merge lib worker0/ worker1/ worker2/\n"
               "  lorasynth library merge all/ shard_*/ --create --json",
    )
    p.add_argument("dir", metavar="LIBDIR", help="the library to merge into")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="libraries whose entries to add")
    p.add_argument("--create", action="store_true",
                   help="create LIBDIR first (base model, layout and embedder of the first SOURCE)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from contextlib import ExitStack

    from lorasynth.library import Library
    from lorasynth.library.merge import merge_libraries

    with ExitStack() as stack:
        sources = [stack.enter_context(Library.open(s)) for s in args.sources]
        if args.create:
            first = sources[0]
            dest = stack.enter_context(Library.create(args.dir, first.base_model, first.layout, first.embedder))
        else:
            dest = stack.enter_context(Library.open(args.dir))
        progress = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            progress = lambda rows: tqdm(rows, desc="merge", unit="entry")  # noqa: E731
        report = merge_libraries(dest, sources, progress=progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for c in report.conflicts:
            print(f"conflict: {c['name']} (from {c['from']}): {c['message']}", file=sys.stderr)
        for d in report.duplicates:
            print(f"duplicate: {d['name']} (from {d['from']}) has the tensors of entry {d['existing_id']} "
                  f"({d['existing_name']})")
        print(report.summary())
    return 0 if report.ok else 1
