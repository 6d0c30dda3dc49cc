"""One number parser for ids and knobs everywhere: the CLI, the Python API, the HTTP server, ComfyUI.

Every number a caller gives (an entry id, a guidance scale, a blend weight, an upload limit)
goes through :func:`parse_int`, :func:`parse_float` or :func:`parse_id`: a finite number of the
right kind, inside its range, or one :class:`~lorasynth.errors.InputError` line that names the
knob and says what it must be. Rules that differ between interfaces are bugs; so are
``str.isdigit`` (true for ``"²"``, which ``int()`` then refuses with a traceback) and bare
``float(text)`` (it accepts ``"nan"`` and ``"inf"``).

Text forms: integers are ASCII digits with an optional sign (``"²"``, ``"٣"``, ``"1_000"``,
``" 7"`` are refused), at most :data:`MAX_DIGITS` digits; floats are what ``float()`` reads,
minus the non-finite words. Booleans are refused everywhere (``True`` is not the number 1 here).
:func:`int_arg` / :func:`float_arg` wrap the parsers as ``argparse`` types.
"""

from __future__ import annotations

import math
import numbers
import re

from lorasynth.errors import InputError

MAX_ID = 2**63 - 1  # SQLite INTEGER PRIMARY KEY, numpy int64, torch seeds
MAX_DIGITS = 40  # no knob needs more; refuses 401-digit strings before converting them
_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def is_id_text(text: object) -> bool:
    """Does ``text`` read as an id (ASCII digits only)? ``"12"`` yes; ``"²"``, ``"١٢"``, ``"-1"``, ``""`` no."""
    return isinstance(text, str) and text.isascii() and text.isdigit()


def _num(x) -> str:
    if isinstance(x, int):
        return "2**63-1" if x == MAX_ID else str(x)
    return f"{x:g}"


def _range_text(minimum, maximum, above=None) -> str:
    low = f"> {_num(above)}" if above is not None else (f">= {_num(minimum)}" if minimum is not None else None)
    if low and maximum is not None:
        return f"{low} and <= {_num(maximum)}" if above is not None else f"{_num(minimum)}..{_num(maximum)}"
    return low or (f"<= {_num(maximum)}" if maximum is not None else "")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_int(value, what: str, *, minimum: int | None = None, maximum: int | None = MAX_ID,
              error: type[Exception] = InputError, strict: bool = False) -> int:
    """``value`` (an int, an integral float, or ASCII-digit text) as an int in ``minimum..maximum``.

    ``maximum`` defaults to :data:`MAX_ID` (2**63 - 1): nothing lorasynth counts is larger,
    and every int it stores must fit SQLite, numpy and torch. ``strict=True`` (a JSON config's
    field): an int only, no text and no float.
    """
    want = "an integer" + (f" ({_range_text(minimum, maximum)})" if minimum is not None or maximum is not None else "")
    if isinstance(value, bool) or value is None or (strict and not isinstance(value, numbers.Integral)):
        raise error(f"{what} must be {want}, got {_shown(value)}")
    if isinstance(value, numbers.Integral):
        number = int(value)
    elif isinstance(value, (float, numbers.Real)) and not isinstance(value, numbers.Integral):
        f = float(value)
        if not math.isfinite(f) or f != int(f):
            raise error(f"{what} must be {want}, got {_shown(value)}")
        number = int(f)
    elif isinstance(value, (str, bytes)):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if len(text) > MAX_DIGITS + 1 or not _INT_TEXT.fullmatch(text):
            raise error(f"{what} must be {want}, got {_shown(text)}")
        number = int(text)
    else:
        raise error(f"{what} must be {want}, got {type(value).__name__}")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise error(f"{what} must be {want}, got {_shown(number)}")
    return number


def parse_float(value, what: str, *, minimum: float | None = None, maximum: float | None = None,
                above: float | None = None, error: type[Exception] = InputError, strict: bool = False) -> float:
    """``value`` (an int, a float, or number text) as a finite float in range.

    ``minimum`` / ``maximum`` are inclusive bounds, ``above`` an exclusive lower bound (``above=0``:
    strictly positive). NaN, infinities, and values that overflow a float64 are refused.
    ``strict=True`` (a JSON config's field): a number only, no text.
    """
    rng = _range_text(minimum, maximum, above)
    want = "a finite number" + (f" ({rng})" if rng else "")
    if isinstance(value, bool) or value is None or (strict and isinstance(value, (str, bytes))):
        raise error(f"{what} must be {want}, got {_shown(value)}")
    if isinstance(value, (str, bytes)):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if len(text) > 100 or not text.isascii():
            raise error(f"{what} must be {want}, got {_shown(text)}")
        try:
            number = float(text.strip())
        except ValueError:
            raise error(f"{what} must be {want}, got {_shown(text)}") from None
    elif isinstance(value, numbers.Real):
        try:
            number = float(value)
        except (OverflowError, ValueError):
            raise error(f"{what} must be {want}, got a number too large for a float") from None
    else:
        raise error(f"{what} must be {want}, got {type(value).__name__}")
    if not math.isfinite(number):
        raise error(f"{what} must be {want}, got {_shown(value if isinstance(value, str) else number)}")
    if ((minimum is not None and number < minimum) or (maximum is not None and number > maximum)
            or (above is not None and number <= above)):
        raise error(f"{what} must be {want}, got {number:g}")
    return number


def parse_id(value, what: str = "entry id", error: type[Exception] = InputError) -> int:
    """An entry id: an int or ASCII-digit text in ``0..2**63-1`` (SQLite's range)."""
    if isinstance(value, str) and not is_id_text(value):
        raise error(f"{what} must be digits 0-9 only, got {_shown(value)}")
    return parse_int(value, what, minimum=0, maximum=MAX_ID, error=error)


def validate_fields(obj, what: str, bounds: dict[str, tuple] | None = None,
                    error: type[Exception] = InputError) -> None:
    """Type- and range-check every field of the dataclass ``obj`` by its annotation, in place.

    The one schema check of a config file (a dataclass per file). ``int`` fields must be ints,
    ``float`` fields finite numbers (stored as float), ``bool`` / ``str`` fields of that type;
    ``X | None`` also allows None. ``bounds`` maps a field to ``(minimum, maximum)`` (``None``:
    open); other types (lists, dicts) are left to the caller.
    """
    import dataclasses

    bounds = bounds or {}
    for f in dataclasses.fields(obj):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        parts = {p.strip() for p in kind.split("|")}
        value = getattr(obj, f.name)
        if value is None and "None" in parts:
            continue
        base = (parts - {"None"}).pop() if len(parts - {"None"}) == 1 else kind
        lo, hi = bounds.get(f.name, (None, None))
        name = f"{what}: {f.name}"
        if base == "int":
            setattr(obj, f.name, parse_int(value, name, minimum=lo, maximum=MAX_ID if hi is None else hi,
                                           error=error, strict=True))
        elif base == "float":
            setattr(obj, f.name, parse_float(value, name, minimum=lo, maximum=hi, error=error, strict=True))
        elif base == "bool" and not isinstance(value, bool):
            raise error(f"{name} must be true or false, got {_shown(value)}")
        elif base == "str" and not isinstance(value, str):
            raise error(f"{name} must be a string, got {_shown(value)}")


def int_arg(minimum: int | None = None, maximum: int | None = MAX_ID):
    """An ``argparse`` type: :func:`parse_int` with these bounds (a bad value is argparse's one error line)."""
    import argparse

    def convert(text: str) -> int:
        try:
            return parse_int(text, "value", minimum=minimum, maximum=maximum)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None

    convert.__name__ = "integer"
    return convert


def float_arg(minimum: float | None = None, maximum: float | None = None, above: float | None = None):
    """An ``argparse`` type: :func:`parse_float` with these bounds (NaN and inf refused)."""
    import argparse

    def convert(text: str) -> float:
        try:
            return parse_float(text, "value", minimum=minimum, maximum=maximum, above=above)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None

    convert.__name__ = "number"
    return convert
