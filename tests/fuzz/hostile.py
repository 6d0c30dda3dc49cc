"""Hostile inputs for every reading command, and an in-process harness that runs them.

:func:`cases` yields :class:`Case` objects: a hostile file (or folder, or library) plus the
commands to run on it. Fixed cases reproduce every failure reported in issue 10; random cases
mutate valid files (header fields replaced by hostile values, offsets shifted, bytes flipped,
truncations, length fields, metadata and configs of the three LoRA formats, .npy embeddings).

:class:`Harness` runs each command through ``lorasynth.apps.cli.main.main`` in this process and
checks the promises: no exception but SystemExit escapes (the CLI turns the project's errors
into exit 2 with one line), a failed command writes nothing (no output, no temp file), and no
file outside the command's own folders is touched (a victim file must survive).
Used by ``tests/fuzz/test_fuzz.py`` (a fast subset) and ``scripts/fuzz.py`` (long runs).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import shutil
import sqlite3
import struct
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
MODULES = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_v"]
HOSTILE_VALUES = [
    None, True, -1, 0, 1, 2**31, 2**63, 2**64 + 5, -(2**62), 1.5, 1e308, float("inf"), float("nan"), "", "x", "F32",
    "320", [], {}, [1], [-1, 2], [0, 2**62, 2**62], [[1]], {"a": 1}, ["F32"], [1.0, 2.0], [3, 1], list(range(40)),
]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "U64", "F8_E4M3", "Q4", "f32", ""]


# --------------------------------------------------------------------------- valid inputs


def valid_lora(seed: int = 0, rank: int = 2):
    from lorasynth.core.lora import LoRA, LoRAModule
    from lorasynth.core.sd15 import sd15_module_shapes

    shapes = sd15_module_shapes()
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name in MODULES:
        out, inp = shapes[name][0], shapes[name][1]
        mods[name] = LoRAModule(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), float(rank))
    return LoRA(mods)


def lora_bytes(fmt: str = "kohya", seed: int = 0) -> bytes:
    from lorasynth.formats.diffusers_format import to_diffusers
    from lorasynth.formats.kohya import to_kohya
    from lorasynth.core.safe_io import safetensors_bytes

    lora = valid_lora(seed)
    tensors, meta = to_kohya(lora, Path("x.safetensors")) if fmt == "kohya" else to_diffusers(lora)
    return safetensors_bytes(tensors, meta)


def peft_bytes(seed: int = 0) -> tuple[bytes, dict]:
    from lorasynth.core.safe_io import safetensors_bytes

    lora = valid_lora(seed)
    tensors = {}
    for name, m in lora.modules.items():
        key = "base_model.model." + name.removeprefix("unet.")
        tensors[f"{key}.lora_A.weight"] = m.down
        tensors[f"{key}.lora_B.weight"] = m.up
    return safetensors_bytes(tensors, {}), {"r": 2, "lora_alpha": 2, "target_modules": ["to_q", "to_v"]}


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header, body: bytes, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(text)) + text + body


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """A hostile input. ``kind`` picks the commands: lora, npy, layout, adapter, library, output."""

    name: str
    kind: str
    data: bytes | None = None
    extra: dict = field(default_factory=dict)


def fixed_cases() -> list[Case]:
    """Every hostile input named in issue 10, and their close relatives."""
    good = lora_bytes()
    h, body = split(good)
    key = sorted(k for k in h if k != "__metadata__")[1]
    first = sorted(k for k in h if k != "__metadata__")[0]

    def entry(**change):
        hh = json.loads(json.dumps(h))
        hh[key].update(change)
        return join(hh, body)

    out: list[Case] = []
    add = lambda name, data, kind="lora", **extra: out.append(Case(name, kind, data, extra))  # noqa: E731
    add("deep-nesting", join(None, body, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    add("deep-metadata", join(None, body, b'{"__metadata__":{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}}"))
    add("shape-infinity", join(None, body, json.dumps(h).replace(json.dumps(h[key]["shape"]), "[Infinity, 320]", 1).encode()))
    add("float-offsets", entry(data_offsets=[float(x) for x in h[key]["data_offsets"]]))
    add("string-shape", entry(shape=[str(x) for x in h[key]["shape"]]))
    add("dtype-list", entry(dtype=["F32"]))
    add("stride-overflow", entry(shape=[0, 2**62, 2**62]))
    add("negative-dim", entry(shape=[-1, 320]))
    add("negative-offsets", entry(data_offsets=[-8, 0]))
    add("reversed-offsets", entry(data_offsets=list(reversed(h[key]["data_offsets"]))))
    hh = json.loads(json.dumps(h))
    hh[key]["data_offsets"] = list(hh[first]["data_offsets"])
    hh[key]["shape"], hh[key]["dtype"] = list(hh[first]["shape"]), hh[first]["dtype"]
    add("overlapping-offsets", join(hh, body))
    add("trailing-bytes", good + b"\0" * 64)
    add("header-length-huge", struct.pack("<Q", 10**12) + good[8:])
    add("header-length-zero", struct.pack("<Q", 0) + good[8:])
    add("empty-file", b"")
    add("seven-bytes", b"\x07" * 7)
    add("json-file", json.dumps({"a": [1, 2], "lora": "x" * 100}).encode())
    add("json-array-file", b"[1, 2, 3]\n")
    add("text-file", b"hello, not a tensor file\n" * 10)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "a plain zip")
    add("plain-zip", buf.getvalue())
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    add("torch-save-zip", buf.getvalue())
    add("raw-pickle", pickle.dumps({"a": 1}, protocol=4))
    add("bad-utf8-header", join(None, body, b'{"\xff\xfe":1}'))
    add("duplicate-keys", join(None, body, json.dumps(h).encode()[:-1] + b"," + json.dumps({key: h[key]}).encode()[1:]))
    add("huge-integer", join(None, body, json.dumps(h).replace(str(h[key]["data_offsets"][1]), "9" * 5000, 1).encode()))
    add("metadata-list", join({**h, "__metadata__": ["a"]}, body))
    add("metadata-value-list", join({**h, "__metadata__": {"ss_network_alpha": [1]}}, body))
    add("metadata-alpha-string", join({**h, "__metadata__": {**h.get("__metadata__", {}), "ss_network_alpha": "abc"}}, body))
    add("network-args-deep", join({**h, "__metadata__": {"ss_network_args": "[" * 20000 + "]" * 20000}}, body))
    dh, dbody = split(lora_bytes("diffusers"))
    dmeta = dh.get("__metadata__", {})
    for name, value in [("adapter-metadata-list", "[1, 2]"), ("adapter-alpha-string", json.dumps({"lora_alpha": "abc", "r": 2})),
                        ("adapter-metadata-deep", "[" * 30000 + "]" * 30000), ("adapter-metadata-notjson", "{oops"),
                        ("adapter-alpha-inf", '{"lora_alpha": Infinity, "r": 2}')]:
        add(name, join({**dh, "__metadata__": {**dmeta, "lora_adapter_metadata": value}}, dbody))
    # shapes that do not match the SD1.5 module they name (same byte count)
    hh = json.loads(json.dumps(h))
    hh[key]["shape"] = list(reversed(hh[key]["shape"]))
    add("transposed-factor", join(hh, body))
    # rank-0 factors
    hh = {k: v for k, v in json.loads(json.dumps(h)).items() if k == "__metadata__"}
    for k, v in h.items():
        if k != "__metadata__":
            shape = [0 if ("lora_down" in k and i == 0) or ("lora_up" in k and i == 1) else d for i, d in enumerate(v["shape"])]
            hh[k] = {**v, "shape": shape, "data_offsets": [0, 0]} if "alpha" not in k else v
    alpha_keys = [k for k in h if k.endswith(".alpha")]
    pos, data = 0, b""
    for k in sorted(hh, key=lambda k: (k == "__metadata__", k)):
        if k in alpha_keys:
            hh[k] = {**h[k], "data_offsets": [pos, pos + 4]}
            data += struct.pack("<f", 2.0)
            pos += 4
        elif k != "__metadata__":
            hh[k]["data_offsets"] = [pos, pos]
    add("rank-zero", join(hh, data))
    # diffusers keys for a module that does not exist
    bad = {k.replace("down_blocks.0", "down_blocks.9"): v for k, v in dh.items()}
    add("unknown-module", join(bad, dbody))
    # NaN weights
    add("nan-weights", body_patch(good, np.float32("nan")))
    # peft configs
    pb, cfg = peft_bytes()
    for name, text in [("peft-config-list", b"[1, 2]"), ("peft-config-not-utf8", b'{"r": 2, "lora_alpha": "\xff"}'),
                       ("peft-alpha-string", json.dumps({**cfg, "lora_alpha": "abc"}).encode()),
                       ("peft-config-deep", b"[" * 50000 + b"]" * 50000), ("peft-config-rank-zero", json.dumps({**cfg, "r": 0}).encode()),
                       ("peft-config-dir", None)]:
        out.append(Case(name, "adapter", pb, {"config": text}))
    # embeddings
    for name, arr in [("emb-strings", np.array(["a"] * 128)), ("emb-structured", np.zeros(128, dtype=[("a", "f4"), ("b", "i4")])),
                      ("emb-zero", np.zeros(128, np.float32)), ("emb-2x64", np.ones((2, 64), np.float32)),
                      ("emb-3e38", np.full(128, 3e38, np.float32)), ("emb-complex", np.ones(128, np.complex64)),
                      ("emb-nan", np.full(128, np.nan, np.float32)), ("emb-bool", np.ones(128, bool)),
                      ("emb-wrong-dim", np.ones(64, np.float32)), ("emb-empty", np.zeros(0, np.float32)),
                      ("emb-1e300", np.full(128, 1e300))]:
        b = io.BytesIO()
        np.save(b, arr, allow_pickle=False)
        add(name, b.getvalue(), "npy")
    b = io.BytesIO()
    np.savez(b, a=np.ones(128, np.float32))
    add("emb-npz", b.getvalue(), "npy")
    b = io.BytesIO()
    np.save(b, np.array([1, "a"], dtype=object), allow_pickle=True)
    add("emb-object-pickle", b.getvalue(), "npy")
    add("emb-truncated", _npy(np.ones(128, np.float32))[:100], "npy")
    add("emb-huge-shape", _npy(np.ones(128, np.float32)).replace(b"(128,)", b"(10**12,)".replace(b"10**12", b"999999999999"), 1), "npy")
    # layouts
    for name, text in [("layout-zero", json.dumps({"version": 1, "modules": [[MODULES[0], [0, 320], [320, 0]]]})),
                       ("layout-list", "[]"), ("layout-deep", "[" * 40000 + "]" * 40000),
                       ("layout-strings", json.dumps({"version": 1, "modules": [["m", ["2", 320], [320, 2]]]})),
                       ("layout-huge", json.dumps({"version": 1, "modules": [["m", [2**40, 2**40], [2**40, 2**40]]]})),
                       ("layout-rank-mismatch", json.dumps({"version": 1, "modules": [["m", [2, 320], [320, 3]]]}))]:
        add(name, text.encode(), "layout")
    # libraries received from others
    for name in ("lib-traversal", "lib-absolute", "lib-types", "lib-attributes-deep", "lib-attributes-notjson",
                 "lib-malformed-db", "lib-not-a-db", "lib-truncated-db", "lib-embedding-garbage", "lib-layout-garbage",
                 "lib-crafted-blob-deep", "lib-crafted-blob-short", "lib-crafted-blob-offsets"):
        out.append(Case(name, "library"))
    # packs received from others (pack.json fields, row files, stats)
    for field_name in ("n", "dim", "embed_dim", "ids", "layout", "layout_signature", "format", "version"):
        for value in (None, -1, 2**40, "x", [], {}, [[1]]):
            out.append(Case(f"pack-json-{field_name}={str(value)[:10]}", "pack", None, {"field": field_name, "value": value}))
    for damage in ("json-deep", "json-list", "json-notutf8", "vectors-header", "vectors-cut", "embeddings-nan",
                   "embeddings-cut", "stats-garbage", "stats-cut", "vectors-missing"):
        out.append(Case(f"pack-{damage}", "pack", None, {"damage": damage}))
    # output paths
    for name in ("out-under-file", "out-onto-dir", "out-fifo", "out-readonly-dir"):
        out.append(Case(name, "output"))
    # special input files
    for name in ("input-directory", "input-fifo", "input-device", "input-missing", "input-under-file"):
        out.append(Case(name, "special"))
    return out


def _npy(arr) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=False)
    return b.getvalue()


def body_patch(data: bytes, value) -> bytes:
    h, body = split(data)
    key = sorted(k for k in h if "up" in k or "lora_B" in k)[0]
    start = h[key]["data_offsets"][0]
    body = body[:start] + np.asarray([value], np.float32).tobytes() + body[start + 4 :]
    return join(h, body)


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One random mutation of a valid safetensors file; returns (description, bytes)."""
    h, body = split(data)
    keys = [k for k in h if k != "__metadata__"]
    op = rng.choice(["field", "field", "add", "shift", "flip", "truncate", "append", "length", "dtype", "shape", "meta", "data"])
    if op == "field":
        k, f = rng.choice(keys), rng.choice(["dtype", "shape", "data_offsets"])
        v = rng.choice(HOSTILE_VALUES)
        h[k][f] = v
        return f"field {f}={str(v)[:30]}", join(h, body)
    if op == "add":
        v = rng.choice(HOSTILE_VALUES + [{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, {"dtype": "F32"}])
        h[rng.choice(["new", "__metadata__", rng.choice(keys)])] = v
        return f"add {str(v)[:30]}", join(h, body)
    if op == "shift":
        k = rng.choice(keys)
        i, d = rng.randrange(2), rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 1 << 20])
        h[k]["data_offsets"][i] += d
        return f"shift {i} {d}", join(h, body)
    if op == "flip":
        (n,) = struct.unpack("<Q", data[:8])
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(min(len(b), 8 + n + 16))] = rng.randrange(256)
        return "flip", bytes(b)
    if op == "truncate":
        cut = rng.randrange(len(data))
        return f"truncate {cut}", data[:cut]
    if op == "append":
        return "append", data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if op == "length":
        (n,) = struct.unpack("<Q", data[:8])
        v = rng.choice([0, 1, 2, n - 1, n + 1, n + 8, len(data), 2**63, 2**64 - 1, rng.randrange(2**64)])
        return f"length {v}", struct.pack("<Q", max(0, min(v, 2**64 - 1))) + data[8:]
    if op == "dtype":
        k = rng.choice(keys)
        h[k]["dtype"] = rng.choice(DTYPES)
        return f"dtype {h[k]['dtype']}", join(h, body)
    if op == "shape":
        k = rng.choice(keys)
        shape = h[k]["shape"]
        choice = rng.choice(["reverse", "extra", "drop", "scale"])
        if choice == "reverse":
            h[k]["shape"] = list(reversed(shape))
        elif choice == "extra":
            h[k]["shape"] = shape + [1]
        elif choice == "drop":
            h[k]["shape"] = shape[1:]
        else:
            h[k]["shape"] = [d * 2 for d in shape]
        return f"shape {choice}", join(h, body)
    if op == "meta":
        meta = dict(h.get("__metadata__") or {})
        key = rng.choice(["ss_network_alpha", "ss_network_dim", "ss_network_args", "lora_adapter_metadata", "ss_base_model_version",
                          "modelspec.architecture", "format"])
        meta[key] = rng.choice(["abc", "[1, 2]", "{}", '{"lora_alpha": "x"}', "Infinity", "-1", "0", "1e999", "[" * 5000,
                                '{"r": 0}', '{"lora_alpha": null}', "sdxl", ""])
        h["__metadata__"] = meta
        return f"meta {key}={meta[key][:20]}", join(h, body)
    value = rng.choice([np.float32("nan"), np.float32("inf"), np.float32(3e38), np.float32(0)])
    return f"data {value}", body_patch(data, value)


def random_cases(n: int, seed: int = 0) -> Iterator[Case]:
    """``n`` random mutations of valid kohya, diffusers and peft files, and of embeddings."""
    rng = random.Random(seed)
    bases = {"kohya": lora_bytes("kohya"), "diffusers": lora_bytes("diffusers")}
    pb, cfg = peft_bytes()
    for i in range(n):
        kind = rng.choice(["kohya", "kohya", "diffusers", "peft", "npy", "config", "pack"])
        if kind in bases:
            what, data = mutate(rng, bases[kind])
            yield Case(f"r{seed}-{i}-{kind}-{what}", "lora", data)
        elif kind == "peft":
            what, data = mutate(rng, pb)
            yield Case(f"r{seed}-{i}-peft-{what}", "adapter", data, {"config": json.dumps(cfg).encode()})
        elif kind == "pack":
            target = rng.choice(["pack.json", "vectors.npy", "embeddings.npy", "stats.safetensors"])
            yield Case(f"r{seed}-{i}-pack-{target}", "pack", None, {"flip": (target, rng.randrange(2**32))})
        elif kind == "config":
            c = dict(cfg)
            k = rng.choice(["r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern"])
            c[k] = rng.choice(HOSTILE_VALUES)
            text = json.dumps(c, allow_nan=True).encode()
            if rng.random() < 0.2:
                text = text[: rng.randrange(len(text))]
            yield Case(f"r{seed}-{i}-config-{k}={str(c[k])[:20]}", "adapter", pb, {"config": text})
        else:
            arr = rng.choice([np.ones(128, np.float32), np.arange(128, dtype=np.int64), np.ones(128, np.float16)])
            data = bytearray(_npy(arr))
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(min(len(data), 140))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[: rng.randrange(len(data))]
            yield Case(f"r{seed}-{i}-npy", "npy", bytes(data))


# --------------------------------------------------------------------------- the harness


@dataclass
class Failure:
    case: str
    command: list[str]
    why: str
    where: str = ""  # innermost lorasynth source line of an escaped exception

    def line(self) -> str:
        return f"{self.case}: lorasynth {' '.join(self.command)}: {self.why}"


class Harness:
    """Runs commands in-process in one scratch folder and records every broken promise."""

    def __init__(self, root: Path, quick: bool = False):
        self.quick = quick  # fewer commands per case (the fast subset of `make test`)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.failures: list[Failure] = []
        self.runs = 0
        self.good = self.root / "good.safetensors"
        self.good.write_bytes(lora_bytes("kohya", seed=1))
        self.good_npy = self.root / "good.npy"
        self.good_npy.write_bytes(_npy(np.random.default_rng(0).normal(size=128).astype(np.float32)))
        self.victim = self.root / "victim" / "victim"
        self.victim.parent.mkdir(exist_ok=True)
        self.victim.write_text("must survive")
        self.lib = self.root / "lib"
        self.run("setup", ["library", "init", str(self.lib), "--base", "sd15", "--layout", str(self.good), "--embedder", "dlib"], expect=(0,))
        self._n = 0

    # ---------------------------------------------------------------- one command
    def run(self, case: str, argv: list[str], expect=(0, 1, 2), outputs: tuple[Path, ...] = ()) -> int | None:
        from lorasynth.apps.cli.main import main

        self.runs += 1
        before = {p: p.read_bytes() if p.is_file() else None for p in outputs}
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException as e:  # noqa: BLE001 - the point of the harness
            frames = [f for f in traceback.extract_tb(e.__traceback__) if "/lorasynth/" in f.filename]
            where = f"{frames[-1].filename.split('/lorasynth/')[-1]}:{frames[-1].lineno}" if frames else "?"
            self.failures.append(Failure(case, argv, f"{type(e).__name__}: {str(e)[:200]} at lorasynth/{where}",
                                         f"lorasynth/{where.split(':')[0]}"))
            return None
        if rc not in expect:
            self.failures.append(Failure(case, argv, f"exit {rc}, expected {expect}; stderr {err.getvalue()[-300:]!r}"))
        if rc == 2:
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            if len(lines) != 1 or not lines[0].startswith("lorasynth: error: "):
                self.failures.append(Failure(case, argv, f"exit 2 without exactly one error line: {err.getvalue()[-300:]!r}"))
        if rc != 0:
            for p in outputs:
                now = p.read_bytes() if p.is_file() else None
                if now != before[p] or (p.exists() and not p.is_file() and before[p] is not None):
                    self.failures.append(Failure(case, argv, f"failed (exit {rc}) but changed {p}"))
                if p.parent.is_dir() and any(q.name.endswith(".tmp") for q in p.parent.iterdir()):
                    self.failures.append(Failure(case, argv, f"failed (exit {rc}) but left a temp file in {p.parent}"))
        if not self.victim.is_file() or self.victim.read_text() != "must survive":
            self.failures.append(Failure(case, argv, "the victim file outside the library was changed or deleted"))
            self.victim.parent.mkdir(exist_ok=True)
            self.victim.write_text("must survive")
        return rc

    # ---------------------------------------------------------------- one case
    def case(self, case: Case) -> None:
        self._n += 1
        d = self.root / f"c{self._n}"
        d.mkdir()
        try:
            getattr(self, f"_{case.kind}")(case, d)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def _lora(self, case: Case, d: Path) -> None:
        f = d / "x.safetensors"
        f.write_bytes(case.data)
        out = d / "out" / "y.safetensors"
        self.run(case.name, ["inspect", "--json", "--modules", str(f)])
        self.run(case.name, ["convert", str(f), str(out), "--to", "diffusers"], outputs=(out,))
        if not self.quick:
            self.run(case.name, ["inspect", str(f)])
            self.run(case.name, ["blend", f"{f}=0.5", f"{self.good}=1", "-o", str(out), "--rank", "100000"], outputs=(out,))
            self.run(case.name, ["library", "add", str(self.lib), str(f), "--name", f"n{self._n}"])
            self.run(case.name, ["library", "init", str(d / "newlib"), "--base", "x", "--layout", str(f)])
        folder = d / "import"
        folder.mkdir()
        shutil.copy(f, folder / f"h{self._n}.safetensors")
        shutil.copy(self.good, folder / "good.safetensors")
        self.run(case.name, ["library", "import", str(self.lib), str(folder)], expect=(0, 1, 2))

    def _adapter(self, case: Case, d: Path) -> None:
        folder = d / "import"
        a = folder / f"p{self._n}"
        a.mkdir(parents=True)
        (a / "adapter_model.safetensors").write_bytes(case.data)
        if case.extra.get("config") is None:
            (a / "adapter_config.json").mkdir()
        else:
            (a / "adapter_config.json").write_bytes(case.extra["config"])
        out = d / "out.safetensors"
        self.run(case.name, ["inspect", str(a / "adapter_model.safetensors")])
        self.run(case.name, ["convert", str(a / "adapter_model.safetensors"), str(out)], outputs=(out,))
        self.run(case.name, ["library", "import", str(self.lib), str(folder)])

    def _npy(self, case: Case, d: Path) -> None:
        e = d / "e.npy"
        e.write_bytes(case.data)
        out = d / "out.safetensors"
        self.run(case.name, ["synthesize", "--model", str(d / "no-model"), "--embedding", str(e), "-o", str(out)], outputs=(out,))
        self.run(case.name, ["library", "add", str(self.lib), str(self.good), "--name", f"e{self._n}", "--embedding", str(e)])
        folder = d / "import"
        folder.mkdir()
        shutil.copy(self.good, folder / "g.safetensors")
        shutil.copy(e, folder / "g.npy")
        self.run(case.name, ["library", "import", str(self.lib), str(folder)])

    def _layout(self, case: Case, d: Path) -> None:
        f = d / "layout.json"
        f.write_bytes(case.data)
        self.run(case.name, ["library", "init", str(d / "lib"), "--base", "x", "--layout", str(f)])
        folder = d / "import"
        folder.mkdir()
        shutil.copy(self.good, folder / f"a{self._n}.safetensors")
        (folder / f"a{self._n}.json").write_bytes(case.data)  # the same hostile JSON as an attributes sidecar
        self.run(case.name, ["library", "import", str(self.lib), str(folder)])

    def _pack(self, case: Case, d: Path) -> None:
        """Packs are read by the Python API (training and synthesis open them): only project errors may escape."""
        from lorasynth.errors import LorasynthError
        from lorasynth.library.pack import open_pack

        good = self.root / "pack"
        if not good.exists():
            self.run("setup", ["library", "pack", str(self.lib), str(good)], expect=(0,))
        pack = d / "pack"
        shutil.copytree(good, pack)
        meta_path = pack / "pack.json"
        damage = case.extra.get("damage")
        if "field" in case.extra:
            meta = json.loads(meta_path.read_text())
            meta[case.extra["field"]] = case.extra["value"]
            meta_path.write_text(json.dumps(meta))
        elif "flip" in case.extra:
            target, flip_seed = case.extra["flip"]
            frng = random.Random(flip_seed)
            raw = bytearray((pack / target).read_bytes())
            for _ in range(frng.randint(1, 6)):
                raw[frng.randrange(min(len(raw), 300))] = frng.randrange(256)
            if frng.random() < 0.3:
                raw = raw[: frng.randrange(len(raw))]
            (pack / target).write_bytes(bytes(raw))
        elif damage == "json-deep":
            meta_path.write_bytes(b"[" * 100000 + b"]" * 100000)
        elif damage == "json-list":
            meta_path.write_text("[1, 2]")
        elif damage == "json-notutf8":
            meta_path.write_bytes(b'{"format": "\xff"}')
        elif damage == "vectors-header":
            raw = bytearray((pack / "vectors.npy").read_bytes())
            raw[20:60] = b"{'descr': '<f4', 'shape': (-5, 999999999999), }"[:40]
            (pack / "vectors.npy").write_bytes(bytes(raw))
        elif damage == "vectors-cut":
            (pack / "vectors.npy").write_bytes((pack / "vectors.npy").read_bytes()[:200])
        elif damage == "vectors-missing":
            (pack / "vectors.npy").unlink()
        elif damage == "embeddings-nan":
            emb = np.load(pack / "embeddings.npy", mmap_mode="r+")
            emb[0, 0] = np.nan
            emb.flush()
            del emb
        elif damage == "embeddings-cut":
            (pack / "embeddings.npy").write_bytes((pack / "embeddings.npy").read_bytes()[:150])
        elif damage == "stats-garbage":
            (pack / "stats.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage}")
        elif damage == "stats-cut":
            (pack / "stats.safetensors").write_bytes((pack / "stats.safetensors").read_bytes()[:100])
        self.runs += 1
        try:
            p = open_pack(pack)
            rows = list(range(len(p)))
            p.read_rows(rows)
            p.read_embeddings(rows)
        except LorasynthError:
            pass
        except BaseException as e:  # noqa: BLE001
            frames = [f for f in traceback.extract_tb(e.__traceback__) if "/lorasynth/" in f.filename]
            where = f"{frames[-1].filename.split('/lorasynth/')[-1]}:{frames[-1].lineno}" if frames else "?"
            self.failures.append(Failure(case.name, ["open_pack", str(pack)], f"{type(e).__name__}: {str(e)[:200]} at lorasynth/{where}",
                                         f"lorasynth/{where.split(':')[0]}"))

    def _special(self, case: Case, d: Path) -> None:
        target = {
            "input-directory": d / "dir.safetensors",
            "input-fifo": d / "fifo.safetensors",
            "input-device": Path("/dev/null"),
            "input-missing": d / "missing.safetensors",
            "input-under-file": self.good / "x.safetensors",
        }[case.name]
        if case.name == "input-directory":
            target.mkdir()
        elif case.name == "input-fifo":
            os.mkfifo(target)
        out = d / "out.safetensors"
        self.run(case.name, ["inspect", str(target)], expect=(2,))
        self.run(case.name, ["convert", str(target), str(out)], expect=(2,), outputs=(out,))
        self.run(case.name, ["library", "add", str(self.lib), str(target)], expect=(2,))
        self.run(case.name, ["synthesize", "--model", str(d), "--embedding", str(target), "-o", str(out)], expect=(2,), outputs=(out,))

    def _output(self, case: Case, d: Path) -> None:
        blocker = d / "file"
        blocker.write_text("a regular file")
        target = {
            "out-under-file": blocker / "y.safetensors",
            "out-onto-dir": d / "adir",
            "out-fifo": d / "fifo",
            "out-readonly-dir": d / "ro" / "y.safetensors",
        }[case.name]
        if case.name == "out-onto-dir":
            target.mkdir()
        elif case.name == "out-fifo":
            os.mkfifo(target)
        elif case.name == "out-readonly-dir":
            target.parent.mkdir()
            target.parent.chmod(0o555)
        expect = (2,) if case.name != "out-readonly-dir" or os.geteuid() != 0 else (0, 2)  # root writes anywhere
        try:
            self.run(case.name, ["convert", str(self.good), str(target)], expect=expect)
            self.run(case.name, ["blend", f"{self.good}=1", "-o", str(target)], expect=expect)
            self.run(case.name, ["library", "export", str(self.lib), "1", str(target)], expect=(2,) if expect == (2,) else (0, 2))
            self.run(case.name, ["synthesize", "--model", str(d), "--embedding", str(self.good_npy), "-o", str(target)], expect=(2,))
            if expect == (2,):  # (as root the read-only folder is writable: embed would load a face model first)
                self.run(case.name, ["embed", str(self.good), "--out", str(target)], expect=(2,))
        finally:
            if case.name == "out-readonly-dir":
                target.parent.chmod(0o755)

    def _library(self, case: Case, d: Path) -> None:
        lib = d / "lib"
        shutil.copytree(self.lib, lib)
        db = lib / "library.sqlite"
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("PRAGMA journal_mode = DELETE")
            n = conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            if n == 0:
                raise AssertionError("the harness library should hold at least one entry")
            name = case.name
            if name == "lib-traversal":
                conn.execute("UPDATE entries SET blob = '../../../victim/victim' WHERE id = (SELECT MIN(id) FROM entries)")
            elif name == "lib-absolute":
                conn.execute("UPDATE entries SET blob = ? WHERE id = (SELECT MIN(id) FROM entries)", (str(self.victim),))
            elif name == "lib-types":
                conn.execute("UPDATE entries SET rank = 'abc', alpha = 'x', name = x'00ff' WHERE id = (SELECT MIN(id) FROM entries)")
            elif name == "lib-attributes-deep":
                conn.execute("UPDATE entries SET attributes = ? WHERE id = (SELECT MIN(id) FROM entries)", ("[" * 100000 + "]" * 100000,))
            elif name == "lib-attributes-notjson":
                conn.execute("UPDATE entries SET attributes = '{oops' WHERE id = (SELECT MIN(id) FROM entries)")
            elif name == "lib-embedding-garbage":
                conn.execute("INSERT OR REPLACE INTO embeddings (entry_id, embedder, dim, vector) "
                             "SELECT id, 'dlib', 'x', 'not bytes' FROM entries")
            elif name.startswith("lib-crafted-blob"):  # a blob whose name is its true hash, but hostile content
                digest = conn.execute("SELECT blob FROM entries WHERE id = (SELECT MIN(id) FROM entries)").fetchone()[0]
                raw = (lib / "blobs" / digest[:2] / f"{digest}.safetensors").read_bytes()
                (n,) = struct.unpack("<Q", raw[:8])
                if name.endswith("deep"):
                    blob = join(None, b"", b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}")
                elif name.endswith("short"):
                    blob = raw[: 8 + n + 100]
                else:
                    hdr = json.loads(raw[8 : 8 + n])
                    for v in hdr.values():
                        if isinstance(v, dict) and "data_offsets" in v:
                            v["data_offsets"] = [x + 1_000_000 for x in v["data_offsets"]]
                    blob = join(hdr, raw[8 + n :])
                import hashlib

                h = hashlib.sha256(blob).hexdigest()
                (lib / "blobs" / h[:2]).mkdir(exist_ok=True)
                (lib / "blobs" / h[:2] / f"{h}.safetensors").write_bytes(blob)
                conn.execute("UPDATE entries SET blob = ? WHERE id = (SELECT MIN(id) FROM entries)", (h,))
            elif name == "lib-layout-garbage":
                conn.execute("UPDATE meta SET value = ? WHERE key = 'layout'", ("[" * 100000 + "]" * 100000,))
            conn.commit()
        if name == "lib-malformed-db":
            raw = bytearray(db.read_bytes())
            for i in range(100, len(raw), 97):
                raw[i] ^= 0x5A
            db.write_bytes(bytes(raw))
        elif name == "lib-not-a-db":
            db.write_bytes(b"this is not a database" * 100)
        elif name == "lib-truncated-db":
            db.write_bytes(db.read_bytes()[:1500])
        for argv in (["library", "verify", str(lib)], ["library", "list", str(lib)], ["library", "show", str(lib), "1"],
                     ["library", "show", str(lib)], ["library", "export", str(lib), "1", str(d / "exp.safetensors")],
                     ["library", "remove", str(lib), "1"], ["library", "verify", "--clean", str(lib)],
                     ["library", "add", str(lib), str(self.good), "--name", "z"],
                     ["library", "pack", str(lib), str(d / "pack")]):
            self.run(name, argv)
        if name in ("lib-traversal", "lib-absolute"):
            rc = self.run(name, ["library", "verify", str(copy_lib(self.lib, d / "lib2", name, self.victim))], expect=(1,))
            assert rc is None or rc == 1


def copy_lib(src: Path, dst: Path, name: str, victim: Path) -> Path:
    """A fresh copy of ``src`` whose blob column points at ``victim`` (verify must call it hostile)."""
    shutil.copytree(src, dst)
    with contextlib.closing(sqlite3.connect(dst / "library.sqlite")) as conn:
        conn.execute("UPDATE entries SET blob = ? WHERE id = (SELECT MIN(id) FROM entries)", ("../../../victim/victim" if name == "lib-traversal" else str(victim),))
        conn.commit()
    return dst


def run_cases(root: Path, n_random: int, seed: int = 0, fixed: bool = True, quick: bool = False) -> dict:
    """Run the fixed cases (optional) and ``n_random`` random ones; a JSON-ready summary."""
    h = Harness(root, quick)
    # seed the library with one good entry so library cases have rows to damage
    h.run("setup", ["library", "add", str(h.lib), str(h.good), "--name", "seed-entry", "--embedding", str(h.good_npy)], expect=(0,))
    tried = 0
    for case in (fixed_cases() if fixed else []):
        h.case(case)
        tried += 1
    for case in random_cases(n_random, seed):
        h.case(case)
        tried += 1
    by_file: dict[str, int] = {}
    for f in h.failures:
        by_file[f.where or "(no exception)"] = by_file.get(f.where or "(no exception)", 0) + 1
    return {"cases": tried, "commands": h.runs, "failures": len(h.failures), "failures_by_file": by_file,
            "failure_lines": [f.line() for f in h.failures]}
