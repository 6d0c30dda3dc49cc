"""In-memory store of the LoRAs this server made (synthesized or blended), bounded, thread-safe.

Ids are random 16-hex-digit tokens; the oldest result is dropped when the store is full.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StoredLoRA:
    id: str
    kind: str  # "synthesized" | "blended"
    label: str
    lora: object
    provenance: dict[str, str]
    vector: np.ndarray | None = None  # flat canonical vector (latent map), when it fits the layout
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"id": self.id, "kind": self.kind, "label": self.label, "provenance": self.provenance, **self.extra}


class ResultStore:
    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._items: OrderedDict[str, StoredLoRA] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, kind: str, label: str, lora, provenance: dict, vector=None, extra: dict | None = None) -> StoredLoRA:
        item = StoredLoRA(secrets.token_hex(8), kind, label, lora, dict(provenance), vector, dict(extra or {}))
        with self._lock:
            self._items[item.id] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return item

    def get(self, item_id: str) -> StoredLoRA | None:
        with self._lock:
            return self._items.get(item_id)

    def list(self) -> list[StoredLoRA]:
        with self._lock:
            return list(self._items.values())
