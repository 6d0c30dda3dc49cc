"""Property-based tests (hypothesis) of the Python API and the parsers, beside the mutation fuzzer.

Each property says what every input, however odd, must give: a value that keeps the parser's
promise (finite, in range, of the right type) or one project error (a ``LorasynthError``
subclass), never another exception. Derandomized (the same examples on every run: not flaky),
no example database, a bounded number of examples per property: the whole file takes seconds.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lorasynth.core.layout import Layout
from lorasynth.core.numbers import MAX_ID, is_id_text, parse_float, parse_id, parse_int
from lorasynth.errors import FormatError, InputError, LayoutError, LorasynthError, ModelError

from helpers import ATTN, sd15_lora

#: examples per property (``LORASYNTH_HYPOTHESIS_EXAMPLES=2000`` for a longer run; a quarter for the slow ones)
EXAMPLES = int(os.environ.get("LORASYNTH_HYPOTHESIS_EXAMPLES", "150"))
settings.register_profile("lorasynth", derandomize=True, database=None, deadline=None, max_examples=EXAMPLES,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("lorasynth")
FEW = settings(max_examples=max(10, EXAMPLES // 4))  # properties that write files or build LoRAs

NAMES = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_v"]
ANY_NUMBER = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.booleans(), st.none(), st.binary(max_size=10), st.just("²"), st.just("1e999"),
    st.just(" 7"), st.just("0x10"), st.just("1_000"), st.lists(st.integers(), max_size=2),
    st.decimals(allow_nan=True, allow_infinity=True), st.fractions(),
)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=20)


# --------------------------------------------------------------------------- the number parser


@given(ANY_NUMBER, st.one_of(st.none(), st.integers(-100, 100)), st.one_of(st.none(), st.integers(-100, 100)))
@example("²", 0, None)
@example(2**63, 0, None)
@example(float("nan"), None, None)
def test_parse_int_gives_an_int_in_range_or_one_input_error(value, lo, hi):
    try:
        got = parse_int(value, "knob", minimum=lo, maximum=hi)
    except InputError as e:
        assert str(e).startswith("knob must be") and "\n" not in str(e) and len(str(e)) < 200
        return
    assert type(got) is int and not isinstance(value, bool)
    assert (lo is None or got >= lo) and (hi is None or got <= hi)


@given(ANY_NUMBER, st.one_of(st.none(), st.floats(-1e3, 1e3)), st.one_of(st.none(), st.floats(-1e3, 1e3)))
@example("nan", None, None)
@example(1e308, -1e3, 1e3)
@example(10**400, None, None)
def test_parse_float_gives_a_finite_float_in_range_or_one_input_error(value, lo, hi):
    try:
        got = parse_float(value, "knob", minimum=lo, maximum=hi)
    except InputError as e:
        assert str(e).startswith("knob must be") and "\n" not in str(e)
        return
    assert type(got) is float and math.isfinite(got)
    assert (lo is None or got >= lo) and (hi is None or got <= hi)


@given(st.integers(min_value=0, max_value=MAX_ID))
def test_every_id_round_trips_through_its_text(n):
    assert parse_id(str(n)) == parse_id(n) == n and is_id_text(str(n))


@given(st.text(max_size=25))
@example("²")
@example("³")
@example("٣")
@example("9223372036854775808")
def test_id_text_is_ascii_digits_and_parse_id_never_raises_anything_else(text):
    assert is_id_text(text) == (text != "" and all("0" <= c <= "9" for c in text))
    try:
        n = parse_id(text)
    except InputError:
        return
    assert 0 <= n <= MAX_ID and str(n) == text.lstrip("0").rjust(1, "0")


# --------------------------------------------------------------------------- strict JSON


@given(st.binary(max_size=300))
def test_parse_json_on_any_bytes_is_a_value_or_one_format_error(raw):
    from lorasynth.core.safe_io import parse_json

    try:
        parse_json(raw, "x.json", expect=None)
    except FormatError as e:
        assert "\n" not in str(e)


@given(JSON)
def test_parse_json_round_trips_what_json_writes(value):
    from lorasynth.core.safe_io import parse_json

    assert parse_json(json.dumps(value), "x", expect=None) == value


@given(st.integers(1, 5000))
def test_deep_nesting_is_refused_before_parsing(depth):
    from lorasynth.core.safe_io import MAX_JSON_DEPTH, parse_json

    text = "[" * depth + "]" * depth
    if depth > MAX_JSON_DEPTH:
        with pytest.raises(FormatError, match="levels deep"):
            parse_json(text, "x", expect=None)
    else:
        assert parse_json(text, "x", expect=None) is not None


# --------------------------------------------------------------------------- layouts


@given(JSON)
def test_layout_from_json_is_a_layout_or_one_layout_error(value):
    try:
        layout = Layout.from_json(json.dumps(value))
    except LayoutError as e:
        assert "\n" not in str(e)
        return
    assert Layout.from_json(layout.to_json()).signature == layout.signature


@given(st.lists(st.tuples(st.sampled_from(NAMES + ["x", ""]), st.integers(-3, 600), st.integers(-3, 600)), max_size=4),
       st.sampled_from([1, 2, None, "1"]))
def test_layout_from_dict_with_crafted_modules(modules, version):
    try:
        layout = Layout.from_dict({"version": version, "modules": [list(m) for m in modules]})
    except LayoutError:
        return
    assert layout.size > 0


# --------------------------------------------------------------------------- LoRA files


@pytest.fixture(scope="module")
def good_file_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("prop") / "good.safetensors"
    sd15_lora(NAMES, rank=2).save(path)
    return path.read_bytes()


@FEW
@given(data=st.data())
def test_load_lora_on_mutated_bytes_is_a_lora_or_one_format_error(good_file_bytes, tmp_path_factory, data):
    from lorasynth.formats import load_lora

    raw = bytearray(good_file_bytes)
    for _ in range(data.draw(st.integers(1, 6), label="edits")):
        kind = data.draw(st.sampled_from(["flip", "header", "cut", "length"]), label="kind")
        if len(raw) < 9:  # cut to almost nothing: no more edits
            break
        if kind == "flip":
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif kind == "header":  # inside the JSON header, where the structure is
            n = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
            if 8 < min(8 + n, len(raw)):
                i = data.draw(st.integers(8, min(8 + n, len(raw)) - 1))
                raw[i] = data.draw(st.sampled_from(b'{}[]",:0123456789-e.aFIN '))
        elif kind == "cut":
            del raw[data.draw(st.integers(0, len(raw))):]
        else:
            raw[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 7, 2**31, 2**63, len(raw), len(raw) - 8])))
    path = tmp_path_factory.mktemp("mut") / "m.safetensors"
    path.write_bytes(bytes(raw))
    try:
        lora = load_lora(path)
    except LorasynthError as e:
        assert "\n" not in str(e)
        return
    assert all(bool(m.up.isfinite().all()) and bool(m.down.isfinite().all()) for m in lora.modules.values())


@FEW
@given(st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
                       st.one_of(st.sampled_from(["F32", "F16", "Q4", ""]), st.lists(st.integers(-5, 2**64), max_size=3),
                                 st.integers(), st.floats(), st.none()), max_size=4),
       st.integers(0, 64))
def test_safetensors_header_entries_are_validated(entry, data_len):
    from lorasynth.core.safe_io import parse_safetensors_header

    raw = json.dumps({"t": entry}).encode()
    try:
        header, _ = parse_safetensors_header("x.safetensors", raw, data_len)
    except FormatError as e:
        assert "\n" not in str(e)
        return
    start, end = header["t"]["data_offsets"]
    assert 0 <= start <= end == data_len


@FEW
@given(st.binary(max_size=200))
def test_safetensors_from_any_bytes_is_tensors_or_one_model_error(raw):
    from lorasynth.core.safe_io import safetensors_from_bytes

    try:
        tensors, _ = safetensors_from_bytes(bytearray(raw), "w.safetensors", ModelError)
    except ModelError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


# --------------------------------------------------------------------------- blends and configs


@FEW
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6)), min_size=1, max_size=4))
def test_blend_weights_give_a_finite_lora_or_one_input_error(weights):
    import lorasynth

    lora = sd15_lora(NAMES, rank=2)
    try:
        out = lorasynth.blend([(lora, w) for w in weights])
    except InputError as e:
        assert "blend weight" in str(e)
        assert any(not math.isfinite(w) or abs(w) > 1000 for w in weights)
        return
    assert all(bool(m.up.isfinite().all()) and bool(m.down.isfinite().all()) for m in out.modules.values())


@given(st.dictionaries(st.sampled_from(["latent_dim", "d_model", "n_heads", "dropout", "enc_layers", "min_chunk", "x"]),
                       st.one_of(st.integers(-5, 2**40), st.floats(), st.text(max_size=3), st.none(), st.booleans(),
                                 st.lists(st.integers(), max_size=1)), max_size=4))
def test_vae_config_from_any_dict_is_valid_or_one_model_error(fields):
    from lorasynth.models.latent.vae import VAE_BOUNDS, VAEConfig

    try:
        cfg = VAEConfig.from_dict(fields)
    except ModelError as e:
        assert "\n" not in str(e)
        return
    assert cfg.d_model % cfg.n_heads == 0
    for name, (lo, hi) in VAE_BOUNDS.items():
        v = getattr(cfg, name)
        assert not isinstance(v, bool) and lo <= v <= hi


@given(st.dictionaries(st.sampled_from(["num_steps", "guidance", "eta", "scheduler", "other"]),
                       st.one_of(st.integers(-5, 10**9), st.floats(), st.text(max_size=4), st.none(),
                                 st.lists(st.integers(), max_size=1)), max_size=4),
       st.integers(1, 2000))
def test_sampling_defaults_never_promise_more_steps_than_run(values, train_timesteps):
    from lorasynth.models.hypernet.model import (DEFAULT_ETA, DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS,
                                                 SCHEDULERS, SamplingDefaults)

    try:
        s = SamplingDefaults.from_dict(values, "hypernet.json", train_timesteps,
                                       {"num_steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "eta": DEFAULT_ETA,
                                        "scheduler": DEFAULT_SCHEDULER}, SCHEDULERS)
    except ModelError as e:
        assert "\n" not in str(e)
        return
    assert 1 <= s.num_steps <= min(train_timesteps, 1000) and math.isfinite(s.guidance) and 0 <= s.eta <= 1


@given(st.dictionaries(st.sampled_from(["guidance", "steps", "seed", "samples", "k", "temperature", "average_rank"]),
                       st.one_of(st.integers(-3, 2**64), st.floats(allow_nan=True, allow_infinity=True), st.none()),
                       max_size=4))
def test_synthesis_settings_are_valid_after_validate_or_one_input_error(values):
    from lorasynth.synthesis.synthesizer import SynthesisSettings

    assume(values.get("samples", 1) is not None and values.get("seed", 0) is not None
           and values.get("average_rank", 1) is not None)
    s = SynthesisSettings(strategy="diffusion", **values)
    try:
        s.validate()
    except InputError as e:
        assert "\n" not in str(e)
        return
    assert s.guidance is None or 0 <= s.guidance <= 50
    assert s.steps is None or 1 <= s.steps <= 1000
    assert 0 <= s.seed <= MAX_ID and 1 <= s.samples <= 256


@FEW
@given(st.one_of(st.text(max_size=12), st.integers(-2, 2**64), st.floats(), st.booleans()))
@example("²")
@example("1")
def test_library_resolve_is_an_entry_or_one_project_error(tmp_path_factory, ref):
    from lorasynth.library import Library

    lib_dir = tmp_path_factory.getbasetemp() / "prop_lib"
    if not lib_dir.exists():
        with Library.create(lib_dir, "sd15", Layout.from_lora(sd15_lora(NAMES, rank=2))) as lib:
            lib.add(sd15_lora(NAMES, rank=2), "first")
    with Library.open(lib_dir) as lib:
        try:
            entry = lib.resolve(ref)
        except LorasynthError as e:
            assert "\n" not in str(e)
            return
        assert entry.name == "first"


def test_hostile_float_examples_are_refused_everywhere():
    """The values of issue 20 #9, once more by name (the properties above sample around them)."""
    for bad in (float("nan"), float("inf"), 1e308):
        with pytest.raises(InputError):
            parse_float(bad, "w", minimum=-1000, maximum=1000)
    assert np.isfinite(parse_float(np.float32(0.5), "w"))
