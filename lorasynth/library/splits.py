"""Train / validation / test splits of a library, by person.

Several LoRAs of one person are near copies of each other, so a split by pack row lets a
held-out person's twin sit in the training set (and in the neighbour search, and in the
standardisation statistics): the held-out score then measures memory, not generalisation.
Every split here keeps all rows of a person on one side.

A row's person is :func:`person_key` of its entry id: the part before the first ``~``
(``alice~2`` is Alice's third LoRA); an id without ``~`` is a person of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERSON_SEPARATOR = "~"


def person_key(entry_id: str) -> str:
    """The person an entry id belongs to (``"alice~2"`` -> ``"alice"``)."""
    return str(entry_id).split(PERSON_SEPARATOR, 1)[0]


def train_test_split(n: int, test_frac: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random split of ``range(n)`` into sorted ``(train_idx, test_idx)`` int64 arrays.

    At least one item lands in each part when ``n >= 2`` and ``0 < test_frac < 1``.
    """
    if not 0.0 <= test_frac <= 1.0:
        raise ValueError(f"test_frac must be in [0, 1], got {test_frac}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_frac))
    if n >= 2 and 0.0 < test_frac < 1.0:
        n_test = min(max(n_test, 1), n - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def split_by_person(ids: Sequence[str], val_frac: float, test_frac: float,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``(train, validation, test)`` (sorted int64) with every person on one side only.

    ``val_frac`` / ``test_frac`` are fractions of the *persons*; each non-zero fraction gets at
    least one person when there are enough of them (training always keeps at least one).
    """
    if val_frac < 0 or test_frac < 0 or val_frac + test_frac >= 1.0:
        raise ValueError(f"need val_frac, test_frac >= 0 with a sum < 1; got {val_frac}, {test_frac}")
    keys = [person_key(i) for i in ids]
    persons = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(persons))
    n_p = len(persons)
    n_test = int(round(n_p * test_frac))
    n_val = int(round(n_p * val_frac))
    if test_frac > 0 and n_p >= 2:
        n_test = max(n_test, 1)
    if val_frac > 0 and n_p - n_test >= 2:
        n_val = max(n_val, 1)
    n_test = min(n_test, max(n_p - 1, 0))
    n_val = min(n_val, max(n_p - 1 - n_test, 0))
    side = np.zeros(n_p, dtype=np.int8)  # 0 train, 1 val, 2 test
    side[order[:n_test]] = 2
    side[order[n_test : n_test + n_val]] = 1
    where = {p: side[j] for j, p in enumerate(persons)}
    row_side = np.array([where[k] for k in keys], dtype=np.int8)
    rows = np.arange(len(keys), dtype=np.int64)
    return rows[row_side == 0], rows[row_side == 1], rows[row_side == 2]


def persons_of(ids: Sequence[str], rows) -> set[str]:
    """The set of persons of ``rows`` (for leak checks)."""
    return {person_key(ids[int(r)]) for r in rows}


__all__ = ["PERSON_SEPARATOR", "person_key", "persons_of", "split_by_person", "train_test_split"]
