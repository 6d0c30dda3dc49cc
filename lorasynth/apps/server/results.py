"""In-memory store of the LoRAs this server made (synthesized or blended), bounded, thread-safe.

Ids are random 16-hex-digit tokens. The store holds at most ``budget_bytes`` of tensor data
(factors plus the flat map vector) and at most ``capacity`` items: adding a result drops the
oldest ones until both hold. A result larger than the whole budget is refused
(:class:`OverBudget`) and drops nothing.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


class OverBudget(Exception):
    """A result that alone exceeds the store's byte budget."""


@dataclass
class StoredLoRA:
    id: str
    kind: str  # "synthesized" | "blended"
    label: str
    lora: object
    provenance: dict[str, str]
    vector: np.ndarray | None = None  # flat canonical vector (latent map), when it fits the layout
    extra: dict = field(default_factory=dict)
    nbytes: int = 0  # tensor bytes held (factors + vector)

    def summary(self) -> dict:
        return {"id": self.id, "kind": self.kind, "label": self.label, "provenance": self.provenance,
                "bytes": self.nbytes, **self.extra}


def lora_nbytes(lora) -> int:
    """Bytes of a LoRA's factor tensors."""
    return sum(t.numel() * t.element_size() for m in lora.modules.values() for t in (m.down, m.up))


class ResultStore:
    def __init__(self, capacity: int, budget_bytes: int):
        self.capacity = max(1, capacity)
        self.budget_bytes = max(1, budget_bytes)
        self._items: OrderedDict[str, StoredLoRA] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, kind: str, label: str, lora, provenance: dict, vector=None, extra: dict | None = None) -> StoredLoRA:
        nbytes = lora_nbytes(lora) + (int(vector.nbytes) if vector is not None else 0)
        if nbytes > self.budget_bytes:
            raise OverBudget(f"the result takes {nbytes / 1e6:.1f} MB, more than this server keeps in memory "
                             f"({self.budget_bytes / 1e6:.1f} MB); ask for a lower rank or fewer items")
        item = StoredLoRA(secrets.token_hex(8), kind, label, lora, dict(provenance), vector, dict(extra or {}), nbytes)
        with self._lock:
            self._items[item.id] = item
            self._bytes += nbytes
            while len(self._items) > self.capacity or self._bytes > self.budget_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return item

    def get(self, item_id: str) -> StoredLoRA | None:
        with self._lock:
            return self._items.get(item_id)

    def list(self) -> list[StoredLoRA]:
        with self._lock:
            return list(self._items.values())

    def usage(self) -> dict:
        """``{"items", "bytes"}`` held now."""
        with self._lock:
            return {"items": len(self._items), "bytes": self._bytes}
