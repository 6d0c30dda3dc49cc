"""``lorasynth embed PHOTO``: find the faces in a photo and print (or save) one face's embedding."""

from __future__ import annotations

import json
from pathlib import Path

from lorasynth.core.numbers import int_arg
from lorasynth.apps.cli.helpfmt import examples
from lorasynth.apps.cli.threads import restores_threads, threads_flag, use_threads

EMBEDDER_NAMES = ("dlib", "arcface")  # lorasynth.faces.EMBEDDER_NAMES, spelled out so `--help` imports no numpy


def register(sub) -> None:
    p = sub.add_parser("embed", help="detect faces in a photo and print the identity embedding of one",
                       description="Find the faces in a photo (largest first) and print the identity embedding of "
                                   "one; --out saves it as a .npy for `synthesize --embedding` or a library.",
                       epilog=examples("lorasynth embed me.jpg", "lorasynth embed group.jpg --face-index 1 --out bob.npy",
                                       "lorasynth embed me.jpg --embedder arcface --model-root ~/.insightface --json"))
    p.add_argument("photo", metavar="PHOTO", help="image file (JPEG, PNG, WebP...)")
    p.add_argument("--embedder", choices=EMBEDDER_NAMES, default="dlib", help="dlib (128-d) or arcface (512-d)")
    p.add_argument("--model-root", help="folder with the face model files (arcface)")
    p.add_argument("--face-index", type=int_arg(0, 1000), default=None, help="which face, largest first (default 0: the largest)")
    p.add_argument("--json", action="store_true", help="print JSON with the full embedding")
    p.add_argument("--out", help="also save the embedding as a float32 .npy (a library sidecar)")
    threads_flag(p)
    p.set_defaults(func=cmd_embed)


@restores_threads
def cmd_embed(args) -> int:
    import numpy as np

    from lorasynth.faces import get_embedder
    from lorasynth.core.safe_io import check_output_path

    if args.out:
        check_output_path(args.out)  # an unwritable --out fails before any work
    use_threads(args)
    embedder = get_embedder(args.embedder, args.model_root)
    faces = embedder.detect_and_embed(args.photo)
    index = 0 if args.face_index is None else args.face_index
    if not faces or not 0 <= index < len(faces):
        embedder.embed_with_report(args.photo, args.face_index)  # raises the standard FaceError
    from lorasynth.faces import FaceSelection

    selection = FaceSelection(face=faces[index], index=index, n_faces=len(faces))
    vec = np.asarray(selection.face.embedding, dtype=np.float32)
    if args.out:
        from lorasynth.core.safe_io import atomic_path

        out = Path(args.out)
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, vec, allow_pickle=False)
    if args.json:
        print(json.dumps({
            "photo": str(args.photo),
            "embedder": embedder.name,
            "dim": int(vec.size),
            "n_faces": len(faces),
            "index": index,
            "selection": selection.describe(),
            "faces": [{"index": i, "box": [round(float(c), 1) for c in f.box], "score": float(f.score)}
                      for i, f in enumerate(faces)],
            "embedding": [float(x) for x in vec],
            "saved": args.out,
        }, indent=2))
        return 0
    print(f"{args.photo}: {selection.describe()} [{embedder.name}]")
    for i, f in enumerate(faces):
        x0, y0, x1, y1 = f.box
        mark = "*" if i == index else " "
        print(f" {mark} face {i}: box ({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f}) {x1 - x0:.0f}x{y1 - y0:.0f}px, score {f.score:.3f}")
    head = ", ".join(f"{x:+.4f}" for x in vec[:6])
    print(f"embedding: {vec.size}-d, L2 norm {float(np.linalg.norm(vec)):.4f}, [{head}, ...]")
    if args.out:
        print(f"saved {args.out}")
    return 0
