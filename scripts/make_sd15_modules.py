"""Regenerate lorasynth/data/sd15_modules.json: every Linear/Conv2d of SD1.5's UNet and text encoder.

The table lets lorasynth resolve LoRA module names against the real SD1.5 module tree
without importing diffusers (a 5 s import) or loading any weights. It is built from
diffusers/transformers on the meta device; tests/test_sd15.py checks it stays in sync.

    python scripts/make_sd15_modules.py
"""

import json
from pathlib import Path

from lorasynth.core.sd15 import build_sd15_module_shapes

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "lorasynth" / "data" / "sd15_modules.json"
    shapes = build_sd15_module_shapes()
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(list(v))}" for k, v in shapes.items())
    out.write_text("{\n" + lines + "\n}\n")
    print(f"wrote {len(shapes)} modules to {out}")
