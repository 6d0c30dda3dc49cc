#!/usr/bin/env python
"""Benchmark the LoRA library and print one JSON object.

Measures, with w2w-shaped LoRAs (64 modules, rank 1, 99,648 values, alpha 27):

* import rate: ``Library.add`` one at a time (fsync on, the default), and ``import_w2w``
  from a memory-mapped w2w-format file (batched transactions);
* pack: ``pack_library`` over an N-entry library (default 20,000) in a child process, with
  its wall time and peak RSS (``VmHWM`` of the child); the library itself is built with a fast path
  (template blob bytes + one SQL transaction), but the pack goes through the real code;
* nearest: ``Library.nearest`` over 65,000 128-d embeddings (rows inserted directly),
  first call (loads the matrix) and the median of warm calls.

    python scripts/bench_library.py --quick          # small scale, ~1 min
    python scripts/bench_library.py                  # 500 imports, 20k pack, 65k nearest
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorasynth.core.layout import W2W_ALPHA, Layout  # noqa: E402
from lorasynth.library import Library, LibraryConfig, import_w2w  # noqa: E402
from lorasynth.library.store import encode_blob  # noqa: E402


def rss_mb(field: str = "VmRSS") -> float:
    """Resident set size (MB) from /proc: ``VmRSS`` now, or ``VmHWM`` (peak of this process image)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def random_w2w_lora(gen: torch.Generator):
    return Layout.w2w().unflatten(torch.randn(Layout.w2w().size, generator=gen) * 0.01, alpha=W2W_ALPHA)


# --------------------------------------------------------------------------- import rate


def bench_imports(work: Path, n_single: int, n_w2w: int) -> dict:
    from lorasynth.formats.w2w import write_w2w_miniature

    gen = torch.Generator().manual_seed(0)
    layout = Layout.w2w()
    out = {}
    loras = [random_w2w_lora(gen) for _ in range(n_single)]
    emb = np.random.default_rng(0).normal(size=(n_single, 128)).astype(np.float32)
    with Library.create(work / "imp_single", "bench", layout, "dlib") as lib:
        t = time.perf_counter()
        for i, lora in enumerate(loras):
            lib.add(lora, f"e{i}", embeddings={"dlib": emb[i]})
        dt = time.perf_counter() - t
    out["add_one_at_a_time"] = {"n": n_single, "seconds": round(dt, 3), "loras_per_s": round(n_single / dt, 1)}
    del loras

    rows = torch.randn(n_w2w, layout.size, generator=gen) * 0.01
    w2w_dir = write_w2w_miniature(work / "w2w", rows)
    del rows
    with Library.create(work / "imp_w2w", "bench", layout, "dlib") as lib:
        t = time.perf_counter()
        report = import_w2w(lib, w2w_dir, progress=False)
        dt = time.perf_counter() - t
        assert len(report.added) == n_w2w, report.summary()
    out["import_w2w"] = {"n": n_w2w, "seconds": round(dt, 3), "loras_per_s": round(n_w2w / dt, 1)}
    shutil.rmtree(work / "w2w", ignore_errors=True)
    shutil.rmtree(work / "imp_single", ignore_errors=True)
    shutil.rmtree(work / "imp_w2w", ignore_errors=True)
    return out


# --------------------------------------------------------------------------- pack


def build_fast_library(path: Path, n: int, dim: int = 128, seed: int = 0) -> float:
    """An n-entry w2w library built without the per-entry add path (benchmark setup only).

    Every blob is the template blob of a real LoRA with its data section replaced by fresh
    random float32 values (alpha slots kept at 27), hashed and written like ``add`` does.
    """
    layout = Layout.w2w()
    t = time.perf_counter()
    template, _ = encode_blob(random_w2w_lora(torch.Generator().manual_seed(seed)))
    (hlen,) = np.frombuffer(template[:8], dtype="<u8")
    head = template[: 8 + int(hlen)]
    header = json.loads(template[8 : 8 + int(hlen)])
    alpha_slots = [v["data_offsets"][0] // 4 for k, v in header.items() if k.endswith(".alpha")]
    n_floats = (len(template) - len(head)) // 4
    rng = np.random.default_rng(seed)
    lib = Library.create(path, "bench", layout, "dlib", LibraryConfig(fsync=False))
    conn = lib._conn
    now = "2025-01-01T00:00:00+00:00"
    batch = []

    def flush():
        conn.execute("BEGIN IMMEDIATE")
        for name, digest, vec in batch:
            cur = conn.execute(
                "INSERT INTO entries (name, blob, layout, rank, alpha, source, created, attributes) VALUES (?,?,?,?,?,?,?,?)",
                (name, digest, layout.signature, 1, W2W_ALPHA, "bench", now, "{}"),
            )
            conn.execute("INSERT INTO embeddings (entry_id, embedder, dim, vector) VALUES (?,?,?,?)",
                         (cur.lastrowid, "dlib", dim, vec.tobytes()))
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        conn.execute("COMMIT")
        batch.clear()

    for i in range(n):
        data = rng.standard_normal(n_floats, dtype=np.float32) * np.float32(0.01)
        data[alpha_slots] = W2W_ALPHA
        blob = head + data.tobytes()
        digest = hashlib.sha256(blob).hexdigest()
        p = lib.blob_path(digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
        vec = rng.standard_normal(dim).astype(np.float32)
        batch.append((f"e{i:06d}", digest, vec / np.linalg.norm(vec)))
        if len(batch) >= 1000:
            flush()
    if batch:
        flush()
    lib.close()
    return time.perf_counter() - t


def pack_child(lib_dir: str, out_dir: str) -> None:
    """Run in a fresh process: pack and report time and peak RSS as JSON on stdout."""
    from lorasynth.library import pack_library

    before = rss_mb()
    with Library.open(lib_dir) as lib:
        t = time.perf_counter()
        result = pack_library(lib, out_dir, progress=False)
        dt = time.perf_counter() - t
    # VmHWM is the peak RSS since exec; ru_maxrss can include the parent's RSS at fork time
    # (Linux keeps it across execve), so it is only reported alongside.
    peak = rss_mb("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"entries": result.entries, "seconds": dt, "rss_before_mb": before, "peak_rss_mb": peak,
                      "ru_maxrss_mb": maxrss}))


def bench_pack(work: Path, n: int) -> dict:
    lib_dir, out_dir = work / "pack_lib", work / "pack_out"
    build_s = build_fast_library(lib_dir, n)
    proc = subprocess.run([sys.executable, __file__, "--pack-child", str(lib_dir), str(out_dir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"n": n, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    shutil.rmtree(lib_dir, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "n": n,
        "build_fast_path_seconds": round(build_s, 1),
        "pack_seconds": round(child["seconds"], 1),
        "pack_loras_per_s": round(n / child["seconds"], 1),
        "peak_rss_mb": round(child["peak_rss_mb"], 1),
        "ru_maxrss_mb": round(child["ru_maxrss_mb"], 1),
        "rss_before_pack_mb": round(child["rss_before_mb"], 1),
        "pack_bytes": size,
        "rss_goal_mb": 2048,
    }


# --------------------------------------------------------------------------- nearest


def bench_nearest(work: Path, n: int, dim: int, repeats: int) -> dict:
    layout = Layout(Layout.w2w().modules[:1])  # rows only: the nearest path never reads blobs
    rng = np.random.default_rng(1)
    with Library.create(work / f"near_{dim}", "bench", layout, "dlib") as lib:
        vecs = rng.standard_normal((n, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        conn = lib._conn
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO entries (id, name, blob, layout, rank, alpha, source, created, attributes) "
            "VALUES (?, ?, ?, ?, 1, 27.0, 'bench', '', '{}')",
            ((i + 1, f"e{i}", f"{i:064x}", layout.signature) for i in range(n)),
        )
        conn.executemany("INSERT INTO embeddings (entry_id, embedder, dim, vector) VALUES (?, 'dlib', ?, ?)",
                         ((i + 1, dim, vecs[i].tobytes()) for i in range(n)))
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        conn.execute("COMMIT")
        queries = rng.standard_normal((repeats, dim)).astype(np.float32)
        t = time.perf_counter()
        first = lib.nearest(queries[0], "dlib", 10)
        cold = time.perf_counter() - t
        times, cpu = [], []
        for q in queries:
            t, c = time.perf_counter(), time.process_time()
            hits = lib.nearest(q, "dlib", 10)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        # correctness spot check against brute force
        best = int(np.argmax(vecs @ (queries[-1] / np.linalg.norm(queries[-1])))) + 1
        assert hits[0].id == best and len(first) == 10
    shutil.rmtree(work / f"near_{dim}", ignore_errors=True)
    return {
        "n": n,
        "dim": dim,
        "k": 10,
        "first_call_ms": round(cold * 1000, 2),
        "median_ms": round(statistics.median(times) * 1000, 3),
        "p90_ms": round(sorted(times)[int(0.9 * len(times))] * 1000, 3),
        "min_ms": round(min(times) * 1000, 3),
        "median_process_cpu_ms": round(statistics.median(cpu) * 1000, 3),
        "goal_ms": 5.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small scale (50 adds, 100 w2w rows, 500-entry pack)")
    ap.add_argument("--imports", type=int, default=None, help="w2w rows for the import_w2w rate (default 500)")
    ap.add_argument("--adds", type=int, default=None, help="one-at-a-time adds (default 500)")
    ap.add_argument("--pack-entries", type=int, default=None, help="library size for the pack (default 20000)")
    ap.add_argument("--nearest-entries", type=int, default=65_000)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    ap.add_argument("--skip", action="append", default=[], choices=("imports", "pack", "nearest"))
    ap.add_argument("--pack-child", nargs=2, metavar=("LIB", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pack_child:
        pack_child(*args.pack_child)
        return 0
    adds = args.adds or (50 if args.quick else 500)
    imports = args.imports or (100 if args.quick else 500)
    pack_n = args.pack_entries or (500 if args.quick else 20_000)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_library_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "scale": "quick" if args.quick else "full",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
    }
    t0 = time.perf_counter()
    try:
        if "nearest" not in args.skip:
            result["nearest"] = [bench_nearest(work, args.nearest_entries, d, args.repeats) for d in (128, 512)]
        if "imports" not in args.skip:
            result["imports"] = bench_imports(work, adds, imports)
        if "pack" not in args.skip:
            result["pack"] = bench_pack(work, pack_n)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_end"] = list(os.getloadavg())
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
