"""The one place numeric settings are range-checked, whichever way they arrive.

A `Number` rule is used three ways: as an argparse `type=` for a command-line flag (`rule.flag`), on a
value from a config file or the API (`rule.check(name, value)`), and on an optional value (`allow_none`).
So `--lr nan` reads `--lr must be a finite number > 0, got nan`, and `lr: .nan` in `train --config FILE` or
`TrainConfig(lr=nan)` the same rule with "(or None)" added. NaN and infinity never pass a rule; bools never
pass for numbers (Python counts True as 1); numpy scalars pass like Python numbers.
"""

from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Number:
    """An int or a finite float within bounds; `low_open`/`high_open` exclude the bound itself."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.integer and self.high is None and self.low in (0, 1) and not self.low_open:
            return "a positive integer" if self.low == 1 else "a non-negative integer"
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"{'an integer' if self.integer else 'a number'} between {_show(self.low)} and {_show(self.high)}"
        kind = "an integer" if self.integer else "a finite number"
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {_show(self.low)}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {_show(self.high)}"
        return " ".join(part for part in (kind, low, "and" if low and high else None, high) if part)

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, name: str, value, allow_none: bool = False):
        """`value` unchanged when it passes; ValueError naming `name` otherwise."""
        if value is None and allow_none:
            return value
        if not self.accepts(value):
            none = " (or None)" if allow_none else ""
            hint = ""
            if isinstance(value, str) and _is_number(value):
                hint = " (text, not a number: YAML reads 1e-3 as text, 1.0e-3 as a number)"
            raise ValueError(f"{name} must be {self.describe()}{none}, got {value!r}{hint}")
        return value

    def parse(self, text: str):
        """A command-line or config-file string -> the number, or ValueError with the rule's sentence."""
        try:
            value = int(text) if self.integer else float(text)
        except (TypeError, ValueError):
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        if not self.accepts(value):
            raise ValueError(f"must be {self.describe()}, got {text}")
        return value

    def flag(self, text: str):
        """argparse `type=`: the CLI's parser turns the message into `--FLAG must be ..., got ...`."""
        try:
            return self.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


COUNT = Number(integer=True, low=1)                  # iterations, batch sizes, detections, threads
NON_NEGATIVE_INT = Number(integer=True, low=0)       # workers, warm-up iterations, image counts
POSITIVE = Number(low=0, low_open=True)              # learning rate, minutes, loss scale
NON_NEGATIVE = Number(low=0)                         # weight decay, gradient clip (0: off)
PROBABILITY = Number(low=0, high=1)                  # thresholds, fractions
DECAY = Number(low=0, high=1, high_open=True)        # --ema: 0 (off) up to, not including, 1
PORT = Number(integer=True, low=1, high=65535)       # TCP ports (serve --port)


def at_least(minimum: int) -> Number:
    """An integer >= minimum (e.g. image sizes)."""
    return Number(integer=True, low=minimum)


@dataclass(frozen=True)
class Each:
    """A list (or a single value) whose every item follows `rule`; items are named `name[i]`."""

    rule: Number

    def check(self, name: str, value, allow_none: bool = False):
        if value is None and allow_none:
            return value
        if not isinstance(value, (list, tuple)):
            return self.rule.check(name, value)
        for i, item in enumerate(value):
            self.rule.check(f"{name}[{i}]", item)
        return value


def check_fields(values: dict, rules: dict, optional=(), prefix: str = "") -> list[str]:
    """One sentence per entry of `values` that breaks its rule in `rules` (entries without a rule, or
    rules without an entry, are not looked at); `optional` names the ones that may be None."""
    problems = []
    for name, rule in rules.items():
        if name in values:
            try:
                rule.check(prefix + name, values[name], allow_none=name in optional)
            except ValueError as e:
                problems.append(str(e))
    return problems


__all__ = ["Number", "Each", "COUNT", "NON_NEGATIVE_INT", "POSITIVE", "NON_NEGATIVE", "PROBABILITY", "DECAY",
           "PORT", "at_least", "check_fields"]
