"""Merge libraries: the entries of per-worker libraries into one, checksums kept, duplicates found.

Workers that build a library in parallel (``library train --shard i/n`` on a SLURM array, a
Kubernetes Job, Ray tasks) either write into one shared library at once (the store is safe
for concurrent writers) or each into its own, merged afterwards with :func:`merge_libraries`.

Every source entry is read with its hash checked, re-encoded and added to the destination
with its name, source, attributes and embeddings. Blobs are canonical (identical tensors
give identical bytes), so the destination's blob hash is the source's; this is checked for
every entry and a mismatch is an error. An entry whose tensors the destination already
holds is a *duplicate* (nothing written; reported with the entry that has them); a name
already used for other tensors is a *conflict* (skipped and reported, the rest goes on).
Re-running a merge is therefore harmless: everything comes back as duplicates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

from lorasynth.errors import LayoutError, LibraryError
from lorasynth.library.store import Library, NewEntry


@dataclass
class MergeReport:
    """What :func:`merge_libraries` did."""

    destination: str
    sources: list[str] = field(default_factory=list)
    read: int = 0  # source entries read (hash-checked)
    added: list[dict] = field(default_factory=list)  # {"name", "id", "blob", "from"}
    duplicates: list[dict] = field(default_factory=list)  # {"name", "from", "blob", "existing_id", "existing_name"}
    conflicts: list[dict] = field(default_factory=list)  # {"name", "from", "blob", "message"}

    @property
    def ok(self) -> bool:
        return not self.conflicts

    def summary(self) -> str:
        return (f"merged {len(self.sources)} librar{'y' if len(self.sources) == 1 else 'ies'} into {self.destination}: "
                f"{self.read} entries read, {len(self.added)} added, {len(self.duplicates)} duplicates "
                f"(already stored), {len(self.conflicts)} name conflicts")

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "summary": self.summary()}


def check_compatible(dest: Library, src: Library) -> None:
    """LayoutError / LibraryError unless ``src``'s entries can go into ``dest`` unchanged."""
    if src.layout.signature != dest.layout.signature:
        raise LayoutError(f"{src.root} has layout {src.layout.signature}, {dest.root} has {dest.layout.signature}: "
                          "only libraries of one layout can be merged")
    if src.base_model != dest.base_model:
        raise LibraryError(f"{src.root} is for base model {src.base_model!r}, {dest.root} for {dest.base_model!r}")


def merge_libraries(dest: Library, sources: Sequence[Library], batch: int = 256,
                    progress: Callable[[Iterable], Iterable] | None = None) -> MergeReport:
    """Add every entry of ``sources`` (in order, each in id order) to ``dest``; see the module docstring.

    All sources are checked for a matching layout and base model before anything is written.
    ``batch`` entries go in per write transaction.
    """
    report = MergeReport(destination=str(dest.root), sources=[str(s.root) for s in sources])
    for src in sources:
        if src.root.resolve() == dest.root.resolve():
            raise LibraryError(f"cannot merge {src.root} into itself")
        check_compatible(dest, src)
    for src in sources:
        entries = src.list()
        pending: list[tuple[NewEntry, str]] = []
        for entry in progress(entries) if progress else entries:
            lora = src.load(entry)  # hash-checked
            lora.metadata = {}
            report.read += 1
            pending.append((NewEntry(lora, entry.name, entry.source, entry.attributes,
                                     src.entry_embeddings(entry.id)), entry.blob))
            if len(pending) >= batch:
                _add(dest, pending, str(src.root), report)
                pending = []
        _add(dest, pending, str(src.root), report)
    return report


def _add(dest: Library, pending: list[tuple[NewEntry, str]], origin: str, report: MergeReport) -> None:
    todo = []
    for item, digest in pending:
        have = dest.find_blob(digest)
        if have is not None:
            report.duplicates.append({"name": item.name, "from": origin, "blob": digest,
                                      "existing_id": have.id, "existing_name": have.name})
            continue
        try:
            taken = dest.resolve(item.name)
        except LibraryError:
            todo.append((item, digest))
            continue
        report.conflicts.append({"name": item.name, "from": origin, "blob": digest,
                                 "message": f"name used by entry {taken.id} with other weights ({taken.blob[:12]})"})
    if not todo:
        return
    try:
        results = dest.add_many([item for item, _ in todo])
    except LibraryError:  # another writer took a name meanwhile: one at a time, to report just that one
        results = []
        for item, digest in todo:
            try:
                results.append(dest.add_many([item])[0])
            except LibraryError as e:
                results.append(None)
                report.conflicts.append({"name": item.name, "from": origin, "blob": digest, "message": str(e)})
    for (item, digest), result in zip(todo, results):
        if result is None:
            continue
        stored = dest.resolve(result.id)
        if result.duplicate:  # added by another writer since the check above
            report.duplicates.append({"name": item.name, "from": origin, "blob": digest,
                                      "existing_id": stored.id, "existing_name": stored.name})
            continue
        if stored.blob != digest:
            raise LibraryError(f"{item.name}: merged blob {stored.blob} differs from the source's {digest} "
                               "(blobs should be canonical); the destination keeps the new entry")
        report.added.append({"name": item.name, "id": result.id, "blob": digest, "from": origin})
