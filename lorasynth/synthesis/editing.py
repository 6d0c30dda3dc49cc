"""Attribute directions in a latent space, learned from library attributes (as weights2weights).

w2w regresses binary CelebA labels (+1/-1) on the PCA coefficients of the identity LoRAs and
moves along the regression direction. Here the same least-squares fit runs on the model's
latent codes (VAE means or PCA coefficients) of the training rows.
"""

from __future__ import annotations

import numpy as np

from lorasynth.errors import LibraryError


def attribute_values(lib, ids: list[str], attribute: str) -> tuple[np.ndarray, np.ndarray]:
    """(pack row indices, float labels) of entries that carry ``attribute``."""
    rows, values = [], []
    for i, entry_id in enumerate(ids):
        try:
            entry = lib.resolve(int(entry_id) if str(entry_id).isdigit() else entry_id)
        except LibraryError:
            continue
        v = (entry.attributes or {}).get(attribute)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append(i)
            values.append(float(v))
        elif isinstance(v, bool):
            rows.append(i)
            values.append(1.0 if v else -1.0)
    return np.asarray(rows, dtype=np.int64), np.asarray(values)


def attribute_direction(syn, lib, attribute: str) -> tuple[np.ndarray, float]:
    """Unit latent direction that increases ``attribute``, and the std of the latents along it."""
    from lorasynth.models.latent import encode_rows

    train = set(int(i) for i in syn.model.info.train_ids)
    rows, y = attribute_values(lib, syn.pack.ids, attribute)
    keep = np.asarray([r in train for r in rows], dtype=bool)
    rows, y = rows[keep], y[keep]
    if len(rows) < 4 or np.unique(y).size < 2:
        raise LibraryError(f"attribute {attribute!r}: need at least 4 training entries with two different values, "
                           f"found {len(rows)}")
    z = encode_rows(syn.latent, syn.pack, rows).double().numpy()
    zc = z - z.mean(axis=0)
    w, *_ = np.linalg.lstsq(np.c_[zc, np.ones(len(zc))], y - y.mean(), rcond=None)
    d = w[:-1]
    d /= max(np.linalg.norm(d), 1e-12)
    return d.astype(np.float32), float((zc @ d).std())
