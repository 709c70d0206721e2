"""Valid ranges of numeric settings, declared once on the dataclass field and checked by one function.

`ConvertOptions` (the `gtakit convert` / `export` options) and the finetune recipe sections declare each numeric
field's range in its metadata (`bounds(...)`); `check_ranges` refuses, in one line naming the option, a value
outside it, and NaN or infinity anywhere (no option means either).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        if self.high is None:
            if self.low == 0 and self.low_open:
                return "positive"
            return f"{'above' if self.low_open else 'at least'} {_number(self.low)}"
        if self.low is None:
            return f"{'below' if self.high_open else 'at most'} {_number(self.high)}"
        return f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"


def _number(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


def bounds(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Range:
    """A field's valid range: `low <= value <= high` (`low_open`/`high_open` exclude the end itself)."""
    return Range(low, high, low_open, high_open)


def check_ranges(obj: Any, name: Callable[[str], str], error: Callable[[str], Exception]) -> None:
    """Every field of dataclass `obj` with a `range` in its metadata: a finite number within it (None passes: it
    means the default). Lists are checked item by item; strings (such as 'full') other than whole numbers are left to their own checks."""
    for f in dataclasses.fields(obj):
        valid: Range | None = f.metadata.get("range")
        if valid is None:
            continue
        value = getattr(obj, f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item.strip().lstrip("-").isdigit():
                item = int(item)  # a width given as text on the command line (it may also be 'full')
            if item is None or isinstance(item, str) or isinstance(item, bool):
                continue
            if not isinstance(item, (int, float)) or not math.isfinite(item):
                raise error(f"{name(f.name)} must be a finite number, {valid.describe()}; got {item}")
            if not valid.allows(item):
                raise error(f"{name(f.name)} must be {valid.describe()}, got {_number(item)}")
