"""The real SD1.5 CLIP tokenizer, built offline, and a sanity check for loaded tokenizers.

Stable Diffusion 1.5 uses OpenAI CLIP's BPE tokenizer (49,408 tokens). Its vocabulary is not
in transformers, and the Hugging Face hub may be unreachable, but the very same BPE merge list
ships inside the PyPI package ``open-clip-torch`` as ``open_clip/bpe_simple_vocab_16e6.txt.gz``
(MIT). :func:`build_clip_tokenizer_files` turns that file into the ``vocab.json`` +
``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads, following the construction in
OpenAI CLIP's / open_clip's ``SimpleTokenizer`` token for token.

Only the data file is used: ``open_clip`` itself is never imported (its import pulls in
torchvision, which is not installed), the file is located with ``importlib.util.find_spec``.

:func:`check_tokenizer` exists because ``CLIPTokenizer.from_pretrained`` with
``HF_HUB_OFFLINE=1`` and no cached files can silently return a 2-token tokenizer that maps
every word to the unknown id; prompts would then be ignored without any error.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from lorasynth.errors import ModelError

#: Number of BPE merges CLIP uses from the merge file (OpenAI CLIP: ``49152 - 256 - 2``).
N_MERGES = 49152 - 256 - 2
#: Resulting vocabulary size: 256 byte tokens, 256 end-of-word byte tokens, merges, 2 specials.
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_CHECK_PROMPT = "a photo of a cat"


def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable unicode character (as in OpenAI CLIP/GPT-2).

    Printable latin-1 bytes map to themselves; the others are shifted to code points from 256
    on, so the BPE never has to deal with whitespace or control characters.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def find_bpe_file() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open-clip-torch`` package.

    Raises:
        ModelError: if open-clip-torch is not installed or the file is missing.
    """
    hint = "install it with `pip install --no-deps open-clip-torch==3.3.0` (only its data file is used)"
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the CLIP vocabulary needs the package open-clip-torch, which is not installed: {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _BPE_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(f"open-clip-torch is installed but has no {_BPE_FILE}: reinstall it; {hint}")


def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """Build CLIP's vocabulary (token -> id) and merge list from the open_clip BPE file.

    The order is exactly OpenAI CLIP's: byte characters, the same with ``</w>``, one token per
    merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    path = Path(bpe_path) if bpe_path is not None else find_bpe_file()
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read the CLIP BPE file {path}: {exc}") from exc
    merges = lines[1 : N_MERGES + 1]  # line 0 is a version header
    if len(merges) != N_MERGES:
        raise ModelError(f"CLIP BPE file {path} is truncated: {len(merges)} merges, expected {N_MERGES}")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ModelError(f"CLIP vocabulary built from {path} has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def build_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write an SD1.5-compatible ``CLIPTokenizer`` folder (no network needed).

    Files: ``vocab.json``, ``merges.txt`` (with the ``#version: 0.2`` header transformers
    skips), ``special_tokens_map.json`` and ``tokenizer_config.json`` (pad = ``<|endoftext|>``,
    id 49407; ``model_max_length`` 77), as in ``runwayml/stable-diffusion-v1-5/tokenizer``.

    Returns:
        ``out_dir`` as a Path; load it with ``CLIPTokenizer.from_pretrained(out_dir)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def check_tokenizer(tokenizer) -> None:
    """Raise ModelError unless ``tokenizer`` looks like a working CLIP tokenizer.

    Checks that the vocabulary is not a placeholder (>= 1000 tokens) and that ordinary words
    ("a photo of a cat") map to real tokens rather than the unknown id.
    """
    size = getattr(tokenizer, "vocab_size", 0) or 0
    hint = (
        "the tokenizer files are missing or broken (a known symptom of loading from the hub "
        "with HF_HUB_OFFLINE=1 and no cache); use a complete diffusers folder with tokenizer/vocab.json"
    )
    if size < 1000:
        raise ModelError(f"tokenizer has only {size} tokens: {hint}")
    ids = tokenizer(_CHECK_PROMPT, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    bad_ids = {unk} if unk is not None else set()
    # CLIP uses <|endoftext|> as its unknown token; an ordinary word must never become it
    bad_ids |= {tid for tid in (tokenizer.eos_token_id, tokenizer.pad_token_id) if tid is not None}
    if not ids or any(i in bad_ids for i in ids):
        raise ModelError(f"tokenizer maps ordinary words to the unknown token ({_CHECK_PROMPT!r} -> {ids}): {hint}")
