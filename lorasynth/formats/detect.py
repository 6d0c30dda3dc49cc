"""Which LoRA file layout a set of tensor keys uses; unsupported kinds named clearly."""

from __future__ import annotations

from lorasynth.errors import FormatError
from lorasynth.formats.keys import some

# Whole-model checkpoints (keys of the original SD layout or of a diffusers UNet): checked first,
# so a checkpoint is never named after a fragment its keys happen to contain (".diff" in
# "model.diffusion_model").
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
# Key fragments of adapter kinds lorasynth does not read (a LoRA-only tool must say so, not misread them).
UNSUPPORTED = (
    ("hada_w1", "LyCORIS LoHa"),
    ("lokr_w", "LyCORIS LoKr"),
    ("lora_magnitude_vector", "DoRA"),
    ("dora_scale", "DoRA"),
    ("lora_mid", "LoCon with Tucker decomposition (lora_mid)"),
    ("oft_", "OFT/BOFT"),
    (".diff", "a LyCORIS 'full' weight-difference model"),
    ("lora_te1_", "SDXL (lora_te1_/lora_te2_); lorasynth supports SD1.5 LoRAs"),
    ("lora_te2_", "SDXL (lora_te1_/lora_te2_); lorasynth supports SD1.5 LoRAs"),
)

KOHYA = "kohya"
DIFFUSERS = "diffusers"
PEFT = "peft"
FORMATS = (KOHYA, DIFFUSERS, PEFT)


def _style(key: str) -> str | None:
    if key.startswith(("lora_unet_", "lora_te_", "bundle_emb.")):
        return KOHYA
    if key.startswith(("unet.", "text_encoder.", "down_blocks.", "mid_block.", "up_blocks.")):
        return DIFFUSERS
    if key.startswith("base_model.model."):
        return PEFT
    return None


def _has(key: str, fragment: str) -> bool:
    if fragment == ".diff":  # LyCORIS full: <name>.diff / <name>.diff_b, never a substring of another word
        return key.endswith((".diff", ".diff_b"))
    return fragment in key


def detect_format(keys, source: str = "file") -> str:
    """Return ``kohya``, ``diffusers`` or ``peft`` for these keys, or raise FormatError."""
    keys = list(keys)
    if not keys:
        raise FormatError(f"{source}: holds no tensors")
    checkpoint = [k for k in keys if k.startswith(CHECKPOINT_PREFIXES)]
    if checkpoint:
        raise FormatError(f"{source}: a full Stable Diffusion checkpoint, not a LoRA (keys like {some(checkpoint, 2)})")
    for fragment, what in UNSUPPORTED:
        hits = [k for k in keys if _has(k, fragment)]
        if hits:
            raise FormatError(f"{source}: {what} is not supported (keys like {some(hits, 2)})")
    styles = {k: _style(k) for k in keys}
    unknown = [k for k, s in styles.items() if s is None]
    if unknown:
        raise FormatError(f"{source}: unrecognized LoRA keys: {some(unknown)}")
    found = set(styles.values())
    if len(found) > 1:
        raise FormatError(f"{source}: mixes key styles {sorted(found)}; expected one of kohya, diffusers, peft")
    return found.pop()
