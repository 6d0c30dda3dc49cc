"""``lorasynth library ...``: create, fill, inspect, check, pack and export a LoRA library.

Other command modules add subcommands to the group (e.g. ``library train``) from their own
``register(sub)``::

    from lorasynth.apps.cli.library import library_subparsers
    p = library_subparsers(sub).add_parser("train", help="...")

:func:`library_subparsers` creates the ``library`` group if it is not there yet, so the
order of the modules in ``COMMAND_MODULES`` does not matter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lorasynth.core.numbers import int_arg
from lorasynth.errors import LibraryError, LorasynthError
from lorasynth.apps.cli.helpfmt import examples

_GROUP_ATTR = "_lorasynth_library_subparsers"


def library_subparsers(sub):
    """The subparsers object of the ``library`` command group (created on first call)."""
    group = getattr(sub, _GROUP_ATTR, None)
    if group is None:
        p = sub.add_parser(
            "library",
            help="manage a LoRA library: init, add, import, import-w2w, list, show, remove, verify, pack, export",
            description="A LoRA library: one base model, one layout, content-addressed LoRA blobs + face embeddings.",
            epilog=examples("lorasynth library init lib --base ./sd15 --layout w2w",
                            "lorasynth library import lib loras/", "lorasynth library list lib"),
        )
        p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
        group = p.add_subparsers(dest="library_command", metavar="ACTION")
        setattr(sub, _GROUP_ATTR, group)
    return group


def register(sub) -> None:
    group = library_subparsers(sub)
    add_init(group)
    add_add(group)
    add_import(group)
    add_import_w2w(group)
    add_list(group)
    add_show(group)
    add_remove(group)
    add_verify(group)
    add_pack(group)
    add_export(group)


# --------------------------------------------------------------------------- helpers


def _open(path: str):
    from lorasynth.library import Library

    return Library.open(path)


def _show_progress() -> bool:
    return sys.stderr.isatty()


def parse_attr(item: str) -> tuple[str, object]:
    """``k=v`` -> (k, v); v is parsed as JSON when it can be (numbers, true/false), else kept as text."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise LorasynthError(f"expected K=V for --attr, got {item!r}")
    from lorasynth.core.safe_io import parse_json

    try:
        parsed = parse_json(value, "--attr", expect=None)
    except LorasynthError:
        parsed = value
    return key.strip(), parsed


def _layout_from_arg(arg: str):
    from lorasynth.formats import load_lora
    from lorasynth.core.layout import Layout

    if arg == "w2w":
        return Layout.w2w()
    path = Path(arg)
    if not path.is_file():
        raise LorasynthError(f"--layout: {arg!r} is neither 'w2w' nor a file")
    if path.suffix.lower() == ".json":
        from lorasynth.errors import LayoutError
        from lorasynth.core.safe_io import read_json

        try:
            return Layout.from_dict(read_json(path, "layout", dict))
        except LayoutError as e:
            raise LayoutError(f"--layout {path}: {e}") from None
    return Layout.from_lora(load_lora(path))


def _print_report(report, as_json: bool) -> int:
    if as_json:
        print(json.dumps({**report.to_dict(), "summary": report.summary()}, indent=2))
    else:
        for source, msg in report.errors:
            print(f"error: {source}: {msg}", file=sys.stderr)
        for source, r in getattr(report, "repaired", []):
            print(f"repaired: entry {r.id} ({r.name}): its missing or corrupt blob was rewritten from {source}")
        for note in report.notes:
            print(f"note: {note}")
        print(report.summary() + ("" if report.ok else " (exit status 1: some items failed, see the errors above)"))
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- commands


def add_init(group) -> None:
    p = group.add_parser("init", help="create an empty library",
                       description="Create an empty library for one base model, one LoRA layout and one face embedder.",
                       epilog=examples("lorasynth library init lib --base ./sd15 --layout w2w",
                                       "lorasynth library init lib --base ./sd15 --layout example.safetensors "
                                       "--embedder arcface"))
    p.add_argument("dir", metavar="LIBDIR", help="library folder")
    p.add_argument("--base", required=True, help="base model id or path the LoRAs are for (recorded)")
    p.add_argument("--layout", default="w2w",
                   help="'w2w' (rank-1 to_q/to_v, 99,648 values), a LoRA .safetensors to copy the layout from, "
                        "or a layout .json")
    p.add_argument("--embedder", default="dlib", help="face embedder for this library: dlib, arcface or none")
    p.set_defaults(func=cmd_init)


def cmd_init(args) -> int:
    from lorasynth.faces import EMBEDDER_NAMES
    from lorasynth.library import Library

    embedder = None if args.embedder.lower() == "none" else args.embedder.lower()
    if embedder is not None and embedder not in EMBEDDER_NAMES:
        raise LorasynthError(f"unknown embedder {args.embedder!r}; choose {', '.join(EMBEDDER_NAMES)} or none")
    layout = _layout_from_arg(args.layout)
    with Library.create(args.dir, args.base, layout, embedder) as lib:
        print(f"created library {lib.root}: base {lib.base_model}, layout {layout.signature} "
              f"({len(layout)} modules, {layout.size} values), embedder {embedder or 'none'}")
    return 0


def add_add(group) -> None:
    p = group.add_parser("add", help="add one LoRA file",
                       description="Add one LoRA file to the library (checked against its layout), with an optional "
                                   "face embedding (from photos or a .npy) and attributes.",
                       epilog=examples("lorasynth library add lib alice.safetensors --photo alice.jpg --attr Male=false"))
    p.add_argument("dir", metavar="LIBDIR", help="library folder")
    p.add_argument("file", metavar="LORA_FILE", help="LoRA file to add")
    p.add_argument("--name", help="entry name (default: file name without extension)")
    p.add_argument("--photo", action="append", default=[], help="face photo to embed (repeatable: averaged)")
    p.add_argument("--embedding", help=".npy face embedding for the library's embedder")
    p.add_argument("--attr", action="append", default=[], metavar="K=V", help="attribute (repeatable; V parsed as JSON if it can be)")
    p.add_argument("--source", help="where the LoRA came from (default: the file path)")
    p.add_argument("--model-root", help="face model folder (arcface)")
    p.set_defaults(func=cmd_add)


def cmd_add(args) -> int:
    import numpy as np

    from lorasynth.formats import load_lora
    from lorasynth.library.importers import KNOWN_DIMS, embed_photos, read_embedding_file

    with _open(args.dir) as lib:
        lora = load_lora(args.file)
        name = args.name or Path(args.file).name.rsplit(".", 1)[0]
        attrs = dict(parse_attr(a) for a in args.attr)
        embeddings: dict[str, np.ndarray] = {}
        if args.embedding or args.photo:
            if not lib.embedder:
                raise LibraryError("this library has no embedder; --embedding/--photo cannot be stored")
            if args.embedding:
                embeddings[lib.embedder] = read_embedding_file(args.embedding, KNOWN_DIMS.get(lib.embedder))
            else:
                from lorasynth.faces import get_embedder

                embeddings[lib.embedder] = embed_photos(get_embedder(lib.embedder, args.model_root), args.photo)
        result = lib.add(lora, name, source=args.source or str(Path(args.file).resolve()), attributes=attrs,
                         embeddings=embeddings)
    if result.duplicate:
        print(f"already in the library as entry {result.id} ({result.name}); nothing added")
    else:
        emb = f", embedding [{', '.join(embeddings)}]" if embeddings else ""
        print(f"added entry {result.id} ({result.name}){emb}")
    return 0


def add_import(group) -> None:
    p = group.add_parser("import", help="import a folder of LoRA files (+ .npy/.json/photo sidecars)",
                       description="Import every LoRA file of a folder; a sidecar with the same stem supplies the "
                                   "embedding (.npy), attributes (.json) or a photo to embed. A bad file is reported "
                                   "and skipped (exit 1 when any failed).",
                       epilog=examples("lorasynth library import lib loras/", "lorasynth library import lib loras/ --json"))
    p.add_argument("dir", metavar="LIBDIR", help="library folder")
    p.add_argument("folder", metavar="FOLDER", help="folder of LoRA files (and sidecars)")
    p.add_argument("--model-root", help="face model folder (arcface)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_import)


def cmd_import(args) -> int:
    from lorasynth.library.importers import import_folder

    with _open(args.dir) as lib:
        report = import_folder(lib, args.folder, model_root=args.model_root, progress=_show_progress())
    return _print_report(report, args.json)


def add_import_w2w(group) -> None:
    p = group.add_parser("import-w2w", help="import rows of the weights2weights dataset (memory-mapped)",
                       description="Import identity LoRAs from the weights2weights dataset; rows are streamed from a "
                                   "memory map, never loaded whole. Re-running skips rows already imported.",
                       epilog=examples("lorasynth library import-w2w lib w2w/ --start 0 --stop 1000",
                                       "lorasynth library import-w2w lib w2w/ --trust-pickle"))
    p.add_argument("dir", metavar="LIBDIR", help="library folder")
    p.add_argument("w2w_dir", metavar="W2W_DIR", help="folder with all_weights.pt (and weight_dimensions.pt, identity_df.pt)")
    p.add_argument("--start", type=int_arg(0), default=0, help="first row to import")
    p.add_argument("--stop", type=int_arg(0), default=None, help="row to stop before (default: the end)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle identity_df.pt for CelebA attributes (a pickle can run code: only for files you trust)")
    p.add_argument("--identity-order", choices=("file", "position"), default="file",
                   help="match identity_df rows to weight rows by sorted 'file' (default) or by position")
    p.add_argument("--batch", type=int_arg(1, 100_000), default=32, help="rows per transaction")
    p.set_defaults(func=cmd_import_w2w)


def cmd_import_w2w(args) -> int:
    from lorasynth.library.importers import import_w2w

    with _open(args.dir) as lib:
        report = import_w2w(lib, args.w2w_dir, args.start, args.stop, trust_pickle=args.trust_pickle,
                            identity_order=args.identity_order, batch_size=args.batch, progress=_show_progress())
    return _print_report(report, False)


def add_list(group) -> None:
    p = group.add_parser("list", help="list entries",
                       description="List the library's entries: id, name, rank, embeddings, source.",
                       epilog=examples("lorasynth library list lib --limit 20", "lorasynth library list lib --json"))
    p.add_argument("dir", metavar="LIBDIR", help="library folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--limit", type=int_arg(0), default=None, help="show at most this many entries")
    p.set_defaults(func=cmd_list)


def cmd_list(args) -> int:
    with _open(args.dir) as lib:
        entries = lib.list(limit=args.limit)
        embs = lib.entry_embedders()
    if args.json:
        print(json.dumps([{**e.to_dict(), "embeddings": embs.get(e.id, [])} for e in entries], indent=2))
        return 0
    print(f"{'id':>6}  {'name':30s} {'rank':>4} {'alpha':>6}  {'embeddings':12s} source")
    for e in entries:
        print(f"{e.id:>6}  {e.name[:30]:30s} {e.rank:>4} {e.alpha:>6g}  {','.join(embs.get(e.id, [])) or '-':12s} {e.source}")
    print(f"{len(entries)} entries")
    return 0


def add_show(group) -> None:
    p = group.add_parser("show", help="show one entry (id or name); with no id, the library summary",
                       description="Show one entry (its id or name), or without ENTRY the library's summary.",
                       epilog=examples("lorasynth library show lib", "lorasynth library show lib alice"))
    p.add_argument("dir", metavar="LIBDIR", help="library folder")
    p.add_argument("id", nargs="?", metavar="ENTRY", help="entry id or name")
    p.set_defaults(func=cmd_show)


def cmd_show(args) -> int:
    with _open(args.dir) as lib:
        info = lib.info() if args.id is None else lib.show(args.id)
    print(json.dumps(info, indent=2))
    return 0


def add_remove(group) -> None:
    p = group.add_parser("remove", help="remove an entry (id or name)",
                       description="Remove an entry; its blob is deleted when no other entry uses it.",
                       epilog=examples("lorasynth library remove lib alice"))
    p.add_argument("dir", metavar="LIBDIR", help="library folder")
    p.add_argument("id", metavar="ENTRY", help="entry id or name")
    p.set_defaults(func=cmd_remove)


def cmd_remove(args) -> int:
    with _open(args.dir) as lib:
        entry = lib.remove(args.id)
    print(f"removed entry {entry.id} ({entry.name})")
    return 0


def add_verify(group) -> None:
    p = group.add_parser("verify", help="re-hash every blob; exit 1 on missing/corrupt blobs",
                       description="Re-hash every blob against the manifest; report missing, corrupt and orphan "
                                   "blobs (exit 1 when any entry is damaged).",
                       epilog=examples("lorasynth library verify lib", "lorasynth library verify lib --clean --json"))
    p.add_argument("dir", metavar="LIBDIR", help="library folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--clean", action="store_true", help="also delete orphan blobs and stale temp files")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    from lorasynth.library.importers import progress_bar

    with _open(args.dir) as lib:
        report = lib.verify(progress=(lambda rows: progress_bar(rows, True, len(rows), "verify", "blob"))
                            if _show_progress() else None)
        cleaned = lib.clean() if args.clean else None
    if args.json:
        out = report.to_dict()
        if cleaned:
            out["cleaned"] = {"orphans": cleaned[0], "temp_files": cleaned[1]}
        print(json.dumps(out, indent=2))
    else:
        print("\n".join(report.lines()))
        if cleaned:
            print(f"removed {cleaned[0]} orphan blob(s) and {cleaned[1]} stale temp file(s)")
    return 0 if report.ok else 1


def add_pack(group) -> None:
    p = group.add_parser("pack", help="write the packed training matrix (canonical vectors + embeddings)",
                       description="Write the library as a pack: canonical LoRA vectors and face embeddings as "
                                   "memory-mappable matrices plus statistics, what `lorasynth train latent --pack` reads.",
                       epilog=examples("lorasynth library pack lib pack/"))
    p.add_argument("dir", metavar="LIBDIR", help="library folder")
    p.add_argument("out", metavar="OUT", help="pack folder to write")
    p.add_argument("--embedder", help="which embeddings to pack (default: the library's embedder; 'none': no embeddings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pack at OUT")
    p.add_argument("--batch", type=int_arg(1, 100_000), default=32, help="entries canonicalized together")
    p.set_defaults(func=cmd_pack)


def cmd_pack(args) -> int:
    from lorasynth.library.packing import pack_library

    with _open(args.dir) as lib:
        embedder = "" if (args.embedder or "").lower() == "none" else args.embedder
        result = pack_library(lib, args.out, embedder=embedder, progress=_show_progress(),
                              batch_size=args.batch, overwrite=args.overwrite)
    print(result.summary())
    return 0


def add_export(group) -> None:
    p = group.add_parser("export", help="write one entry as a LoRA file",
                       description="Write one library entry as a LoRA file.",
                       epilog=examples("lorasynth library export lib alice alice.safetensors"))
    p.add_argument("dir", metavar="LIBDIR", help="library folder")
    p.add_argument("id", metavar="ENTRY", help="entry id or name")
    p.add_argument("out", metavar="OUT", help="LoRA file to write")
    p.add_argument("--to", choices=("kohya", "diffusers"), default="kohya", help="layout of OUT")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    with _open(args.dir) as lib:
        path = lib.export(args.id, args.out, args.to)
    print(f"wrote {path} ({args.to})")
    return 0
