"""Budgets as typed on the command line ("1.2GMACs", "30ms", "4MB", "50%") -> `Budget` objects.

A budget is an upper limit on one metric of the compressed model. The search turns each budget
into an Optuna constraint value, `violation()`, which is <= 0 when the budget is met, so that
infeasible candidates still tell the sampler how far off they were.

What `parse_budget` accepts (units are case-insensitive; spaces are ignored):

- MACs per image: `MACs` with an SI prefix: `450KMACs`, `300MMACs`, `1.2GMACs`, `0.5TMACs`,
  `5e8MACs`. K/M/G/T are 10^3/10^6/10^9/10^12. FLOPs are refused (1 MAC is 2 FLOPs in some
  tools and 1 in others), and so is `MAC` without the `s`, so that every budget reads one way.
- Latency on the target: `30ms`, `1.5s`, `500us` (also `µs`); stored in milliseconds.
- Stored model size: `B`, `KB`, `MB`, `GB` are decimal (10^3, 10^6, 10^9 bytes, as disk and
  flash vendors count); `KiB`, `MiB`, `GiB` are binary (2^10, 2^20, 2^30). Sizes are always
  bytes: `4Mb` means 4 MB, because nobody budgets a model in bits.
- A share of the base model's MACs: `50%`, more than 0% and at most 100%.

Numbers are parsed as exact decimals, so `str(budget)` parses back to exactly the same limit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, localcontext

from edgeopt.errors import EdgeoptError

KINDS: tuple[str, ...] = ("macs", "latency_ms", "bytes", "macs_share")

# unit (lower case) -> (kind, multiplier into the kind's base unit)
_UNITS: dict[str, tuple[str, Decimal]] = {
    "macs": ("macs", Decimal(1)),
    "kmacs": ("macs", Decimal(10) ** 3),
    "mmacs": ("macs", Decimal(10) ** 6),
    "gmacs": ("macs", Decimal(10) ** 9),
    "tmacs": ("macs", Decimal(10) ** 12),
    "us": ("latency_ms", Decimal("0.001")),
    "\u00b5s": ("latency_ms", Decimal("0.001")),  # micro sign
    "\u03bcs": ("latency_ms", Decimal("0.001")),  # Greek mu, what the micro sign case-folds to
    "ms": ("latency_ms", Decimal(1)),
    "s": ("latency_ms", Decimal(1000)),
    "b": ("bytes", Decimal(1)),
    "kb": ("bytes", Decimal(10) ** 3),
    "mb": ("bytes", Decimal(10) ** 6),
    "gb": ("bytes", Decimal(10) ** 9),
    "kib": ("bytes", Decimal(2) ** 10),
    "mib": ("bytes", Decimal(2) ** 20),
    "gib": ("bytes", Decimal(2) ** 30),
    "%": ("macs_share", Decimal("0.01")),
}

# How __str__ writes each kind, in order of preference when two forms are equally short.
_DISPLAY: dict[str, tuple[tuple[str, Decimal], ...]] = {
    "macs": (("GMACs", Decimal(10) ** 9), ("MMACs", Decimal(10) ** 6), ("KMACs", Decimal(10) ** 3),
             ("TMACs", Decimal(10) ** 12), ("MACs", Decimal(1))),
    "latency_ms": (("ms", Decimal(1)), ("s", Decimal(1000))),
    "bytes": (("MB", Decimal(10) ** 6), ("KB", Decimal(10) ** 3), ("GB", Decimal(10) ** 9),
              ("MiB", Decimal(2) ** 20), ("KiB", Decimal(2) ** 10), ("GiB", Decimal(2) ** 30),
              ("B", Decimal(1))),
    "macs_share": (("%", Decimal("0.01")),),
}

_EXAMPLES = ("MACs per image (1.2GMACs, 300MMACs, 450KMACs), latency on the target (30ms, 1.5s), "
             "stored size (4MB, 800KB, 2MiB) or a share of the base model's MACs (50%)")

# ASCII digits only: Python's float() would also take other scripts' digits.
_NUMBER = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_BUDGET = re.compile(rf"(?P<sign>[+-]?)(?P<number>{_NUMBER})(?P<unit>.*)", re.DOTALL)


@dataclass(frozen=True, kw_only=True)
class Budget:
    """An upper limit on one metric. `value` is in MACs, milliseconds, bytes, or a share in (0, 1]."""

    kind: str
    value: float
    text: str = ""  # as the user typed it, for messages and reports

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EdgeoptError(f"Budget kind {self.kind!r} is unknown; use one of {list(KINDS)}.")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise EdgeoptError(f"A budget value must be a number, got {self.value!r}.")
        if not math.isfinite(self.value) or self.value <= 0:
            raise EdgeoptError(f"A budget must be a positive, finite number, got {self.value!r}.")
        if self.kind == "macs_share" and self.value > 1:
            raise EdgeoptError(f"A share of the base model's MACs must be at most 1 (100%), "
                               f"got {self.value!r}.")
        object.__setattr__(self, "value", float(self.value))

    @property
    def metric(self) -> str:
        """The measured quantity this budget limits: "macs", "latency_ms" or "bytes"."""
        return "macs" if self.kind in ("macs", "macs_share") else self.kind

    def limit(self, base_macs: int | None = None) -> float:
        """The absolute limit in the metric's unit; a share needs the base model's MACs."""
        if self.kind != "macs_share":
            return self.value
        if base_macs is None or isinstance(base_macs, bool) or not base_macs > 0:
            raise EdgeoptError(f"The budget {self} is a share of the base model's MACs, which "
                               f"must be a positive number (got {base_macs!r}).")
        return self.value * base_macs

    def violation(self, measured: float, base_macs: int | None = None) -> float:
        """(measured - limit) / limit: <= 0 means the budget is met (Optuna's constraint value).

        Relative, so that budgets on different metrics are on one scale when combined.
        """
        limit = self.limit(base_macs)
        return (measured - limit) / limit

    def __str__(self) -> str:
        return _format(self.kind, self.value)


def _number_text(number: Decimal) -> str:
    """An exact decimal as `parse_budget` reads it back: plain digits unless that gets long."""
    number = number.normalize()
    fixed = format(number, "f")
    if "." in fixed:
        fixed = fixed.rstrip("0").rstrip(".")
    scientific = format(number, "e").replace("e+", "e")
    return fixed if len(fixed) <= 12 or len(scientific) >= len(fixed) else scientific


def _format(kind: str, value: float) -> str:
    with localcontext() as ctx:
        ctx.prec = 80  # exact: a float has <= 17 significant digits, and 2^30 adds at most 30
        exact = Decimal(repr(value))
        forms = [(exact / scale, unit) for unit, scale in _DISPLAY[kind]]
    # Shortest first; on a tie, a number >= 1 ("300MMACs", not "0.3GMACs"), then the preferred unit.
    ranked = sorted(enumerate(forms), key=lambda item: (
        len(_number_text(item[1][0]) + item[1][1]), item[1][0] < 1, item[0]))
    number, unit = ranked[0][1]
    return _number_text(number) + unit


def _refuse(text: str, hint: str) -> EdgeoptError:
    return EdgeoptError(f"Cannot read the budget {text!r}: {hint}")


def parse_budget(text: str) -> Budget:
    """Read one budget; anything unreadable raises EdgeoptError saying what to write instead."""
    if not isinstance(text, str):
        raise EdgeoptError(f"A budget must be text such as '1.2GMACs', got {text!r}.")
    compact = re.sub(r"\s+", "", text)
    if not compact:
        raise EdgeoptError(f"The budget is empty. Write {_EXAMPLES}.")
    match = _BUDGET.fullmatch(compact)
    if match is None:
        raise _refuse(text, f"write a number and a unit: {_EXAMPLES}.")
    number_text, unit = match["number"], match["unit"]
    if match["sign"] == "-":
        raise _refuse(text, f"a budget is an upper limit and must be positive, for example "
                            f"{number_text}{unit}.")
    lowered = unit.lower()
    if lowered not in _UNITS:
        raise _refuse(text, _unit_hint(number_text, unit, lowered))
    kind, scale = _UNITS[lowered]
    try:
        with localcontext() as ctx:
            ctx.prec = 80
            exact = Decimal(number_text) * scale
        value = float(exact)
    except (ArithmeticError, ValueError):  # decimal.Overflow, InvalidOperation, OverflowError
        value = math.inf
    if not math.isfinite(value):
        raise _refuse(text, "the number is too large; write a finite limit such as 1.2GMACs.")
    if value <= 0:
        example = "50%" if kind == "macs_share" else f"1{unit}"
        raise _refuse(text, f"a budget must be more than zero, for example {example}.")
    if kind == "macs_share" and value > 1:
        raise _refuse(text, "a share of the base model's MACs must be at most 100% (the base model "
                            "itself); write for example 50%, or leave out this budget.")
    return Budget(kind=kind, value=value, text=text)


def _unit_hint(number: str, unit: str, lowered: str) -> str:
    if not unit:
        return f"it has no unit; write {_EXAMPLES}."
    if lowered.endswith("mac") and lowered[:-3] in ("", "k", "m", "g", "t"):
        return f"write MACs with a final s: {number}{unit}s."
    if "flop" in lowered:
        return ("budgets are in MACs, not FLOPs (tools count a multiply-accumulate as one or two "
                "FLOPs); convert your figure to MACs and write for example 1.2GMACs.")
    if lowered in ("m", "k", "g", "t"):
        return f"write the unit in full: {number}{unit}MACs, {number}{unit}B or {number}ms."
    return f"the unit {unit!r} is unknown; write {_EXAMPLES}."
