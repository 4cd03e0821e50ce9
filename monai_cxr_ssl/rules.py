"""What a setting's value must be: small predicates with the words an error message uses, shared by the general
settings (``monai_cxr_ssl.settings``) and the settings each method declares (``monai_cxr_ssl.methods``).

A rule is a ``(test, expected)`` pair: ``test(value)`` is true for a good value, ``expected`` completes the error
message "setting key=value must be ...". Nothing here imports torch or MONAI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["BOOL", "NON_NEGATIVE", "POSITIVE", "PROBABILITY", "Rule", "at_least", "choice", "interval", "pair", "rule",
           "whole"]

Rule = tuple[Callable[[Any], bool], str]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rule(test: Callable[[Any], bool], expected: str, nullable: bool = False) -> Rule:
    """A rule from a predicate; ``nullable`` also accepts None."""
    if nullable:
        return (lambda v: v is None or test(v)), f"{expected}, or null"
    return test, expected


def interval(low: float, high: float, closed_low: bool, closed_high: bool, nullable: bool = False) -> Rule:
    """A number between ``low`` and ``high``, each end in or out."""
    text = f"a number in {'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
    return rule(
        lambda v: _number(v) and (v >= low if closed_low else v > low) and (v <= high if closed_high else v < high),
        text, nullable,
    )


def whole(minimum: int, nullable: bool = False) -> Rule:
    """A whole number (not a bool) of at least ``minimum``."""
    return rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
                f"a whole number >= {minimum}", nullable)


def at_least(minimum: float) -> Rule:
    """A finite number of at least ``minimum``."""
    return rule(lambda v: _number(v) and v >= minimum, f"a number >= {minimum:g}")


def pair(low: float, high: float) -> Rule:
    """A range ``[a, b]``: two numbers with ``low < a <= b <= high``."""
    return rule(lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) for x in v)
                and low < v[0] <= v[1] <= high, f"a range [a, b] with {low:g} < a <= b <= {high:g}")


def choice(*options: Any) -> Rule:
    """One of ``options``."""
    return rule(lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))


BOOL = rule(lambda v: isinstance(v, bool), "true or false")
PROBABILITY = interval(0, 1, True, True)
POSITIVE = rule(lambda v: _number(v) and v > 0, "a number > 0")
NON_NEGATIVE = at_least(0)
