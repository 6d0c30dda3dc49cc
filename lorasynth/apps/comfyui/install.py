"""``lorasynth comfyui install``: link the node pack into a ComfyUI folder."""

from __future__ import annotations

import os
from pathlib import Path

from lorasynth.errors import LorasynthError

#: Folder name under ``custom_nodes``. Not ``lorasynth``: ComfyUI imports a custom node under
#: its folder name, which would shadow the ``lorasynth`` package itself.
LINK_NAME = "comfyui-lorasynth"
PACK_DIR = Path(__file__).resolve().parent
WORKFLOWS_DIR = PACK_DIR / "workflows"


def install(comfy_dir: str | os.PathLike, name: str = LINK_NAME) -> list[str]:
    """Symlink ``COMFY_DIR/custom_nodes/<name>`` to this pack and create ``models/lorasynth``.

    Returns one line per action. Re-running is harmless; an unrelated file or folder in the
    way is an error (never replaced).
    """
    comfy = Path(comfy_dir).expanduser().resolve()
    if not (comfy / "custom_nodes").is_dir() or not (comfy / "nodes.py").is_file():
        raise LorasynthError(f"{comfy} does not look like a ComfyUI folder (no custom_nodes/ and nodes.py)")
    if name in ("", ".", "..", "lorasynth") or "/" in name or os.sep in name:
        raise LorasynthError(f"invalid custom node folder name {name!r} (and 'lorasynth' would shadow the package)")
    done = []
    link = comfy / "custom_nodes" / name
    if link.is_symlink() and link.resolve() == PACK_DIR:
        done.append(f"already linked: {link} -> {PACK_DIR}")
    elif link.exists() or link.is_symlink():
        raise LorasynthError(f"{link} already exists and is not a link to {PACK_DIR}; remove it first")
    else:
        link.symlink_to(PACK_DIR, target_is_directory=True)
        done.append(f"linked {link} -> {PACK_DIR}")
    models = comfy / "models" / "lorasynth"
    if not models.is_dir():
        models.mkdir(parents=True)
        done.append(f"created {models} (put synthesis model folders here)")
    done.append(f"example workflows: {WORKFLOWS_DIR}")
    done.append("restart ComfyUI to load the nodes (category 'lorasynth')")
    return done
