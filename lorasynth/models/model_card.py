"""The model card (``README.md``) of a shared model folder, Hugging Face hub style.

A YAML header the hub indexes (``library_name: lorasynth``, ``base_model``, ``license``,
``tags``, plus lorasynth's own ``embedder``, ``embed_dim``, ``layout_signature``, ``latent``),
then a body: how to use it, the ``lorasynth eval`` table when one exists, intended use and
the caveats of a model that turns faces into LoRAs. :func:`read_model_card` parses the header
back.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorasynth import __version__
from lorasynth.errors import ModelError

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TAGS = ["lorasynth", "lora", "stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "hypernetwork",
        "face-identity"]
_MAX_CARD = 4 * 2**20


def card_metadata(model, base_model: str | None = None, license: str = "other") -> dict:
    """The YAML header of ``model``'s card, as a dict."""
    info = model.info
    return {
        "library_name": "lorasynth",
        "base_model": base_model or DEFAULT_BASE_MODEL,
        "license": license,
        "tags": list(TAGS),
        "embedder": info.embedder,
        "embed_dim": info.embed_dim,
        "layout_signature": info.layout_signature,
        "latent": info.latent_kind,
        "hypernetwork": bool(info.has_hypernet),
        "lorasynth_version": __version__,
    }


def _eval_table(results: dict | None) -> str:
    strategies = (results or {}).get("strategies") if isinstance(results, dict) else None
    if not isinstance(strategies, dict) or not strategies:
        return "No evaluation was recorded with this model (run `lorasynth eval --model MODEL`).\n"
    rows = ["| strategy | held-out ΔW cosine | relative error | identities |", "|---|---|---|---|"]
    for name, r in strategies.items():
        if not isinstance(r, dict):
            continue
        cos, err, n = r.get("delta_cosine_mean"), r.get("relative_error_mean"), r.get("n")
        fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
        rows.append(f"| {name} | {fmt(cos)} | {fmt(err)} | {n if isinstance(n, int) else '–'} |")
    latent = results.get("latent") if isinstance(results, dict) else None
    note = ""
    if isinstance(latent, dict) and isinstance(latent.get("reconstruction_delta_cosine"), (int, float)):
        note = f"\nLatent model ({latent.get('kind')}) held-out reconstruction cosine: {latent['reconstruction_delta_cosine']:.4f}.\n"
    return ("Held-out identities (never seen in training), cosine between the synthesized and the true "
            "LoRA update ΔW (`lorasynth eval`):\n\n" + "\n".join(rows) + "\n" + note)


def render_model_card(model, base_model: str | None = None, license: str = "other", eval_results: dict | None = None) -> str:
    """The full ``README.md`` text for a shared model folder."""
    import yaml

    meta = card_metadata(model, base_model, license)
    info = model.info
    pack_note = ("The training pack is included (`pack/`): every strategy works." if info.pack else
                 "The training pack is not included: the `diffusion` strategy works; `nearest` and `blend` need "
                 "the pack (`pack=` / `--pack`).")
    photo = info.embedder in ("dlib", "arcface")
    usage_input = '"me.jpg", seed=0' if photo else "embedding=e, seed=0"
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"""---
{header}---

# lorasynth synthesis model ({info.embedder}, {info.latent_kind or 'no'} latent)

A [lorasynth](https://pypi.org/project/lorasynth/) model: it turns one face
{'photo' if photo else 'embedding'} into a Stable Diffusion 1.5 LoRA of that identity with no
training at synthesis time (zero-shot LoRA synthesis: a conditional diffusion "hypernetwork"
samples a latent that a LoRA-VAE decodes into LoRA weights).

- embedder: `{info.embedder}` ({info.embed_dim}-d face embeddings)
- LoRA layout: `{info.layout_signature}` ({len(model.layout.modules)} modules, {model.layout.size:,} values)
- latent model: `{info.latent_kind}`; hypernetwork: {'yes' if info.has_hypernet else 'no'}
- {pack_note}

## Use

```python
import lorasynth

syn = lorasynth.Synthesizer.from_pretrained("THIS_REPO")
lora = syn({usage_input})
lora.save("me.safetensors")        # kohya: A1111, ComfyUI and diffusers read it
```

```bash
lorasynth synthesize --face me.jpg --model THIS_REPO -o me.safetensors
```

The LoRA works with the prompt "a photo of sks person" on the base model `{meta['base_model']}`.

## Evaluation

{_eval_table(eval_results)}
## Intended use

Research and personal creative use: personalizing images of **yourself or of people who agreed
to it**, studying identity spaces of diffusion models, baselines for LoRA synthesis.

## Face data: caveats

- A face photo and its embedding are biometric data. lorasynth runs locally and sends nothing
  anywhere; keep it that way for other people's photos.
- Do not synthesize LoRAs of people without their consent, and do not use the outputs to
  impersonate, deceive, harass or make sexual content of real people.
- The model reproduces the identities and biases of the LoRA library it was trained on
  (e.g. weights2weights identities derived from CelebA, which over-represents some groups);
  similarity to the photo is not guaranteed and varies across groups.
- Integrity: `lorasynth_model.json` records the SHA-256 of every weight file; lorasynth
  verifies them on load and refuses altered files.
"""


def read_model_card(folder: str | os.PathLike) -> dict:
    """The YAML header of ``folder/README.md`` as a dict (ModelError when absent or malformed)."""
    import yaml

    path = Path(folder) / "README.md"
    try:
        if path.stat().st_size > _MAX_CARD:
            raise ModelError(f"{path} is too large for a model card")
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ModelError(f"cannot read model card {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ModelError(f"model card {path} is not UTF-8 text") from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---" or "---" not in (s.strip() for s in lines[1:]):
        raise ModelError(f"model card {path} has no YAML header (--- ... ---)")
    end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    try:
        meta = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as e:
        raise ModelError(f"model card {path} has a malformed YAML header: {str(e).splitlines()[0]}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"model card {path}: the YAML header is not a mapping")
    return meta
