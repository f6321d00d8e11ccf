"""What a measurement produces: Variants (samples of one way of doing the
thing) grouped into Rows (one line of the table, with target and verdict).

A ratio is always ``cowfs median / baseline median``: below 1 cowfs is faster.
"""

import math
import statistics
import traceback
from dataclasses import dataclass, field

from .cowfs_cli import CowfsError
from .system import CommandFailed, warn


@dataclass
class Variant:
    label: str                      # "cowfs", "native", "shadow git", ...
    unit: str = "ms"
    samples: list = field(default_factory=list)
    error: str = None               # "error: ..." or "not available: ..."

    @property
    def ok(self):
        return self.error is None and bool(self.samples)

    @property
    def median(self):
        return statistics.median(self.samples) if self.ok else None

    def add(self, value):
        self.samples.append(value)

    def fail(self, text):
        if self.error is None:      # keep the first error
            self.error = text

    def to_json(self):
        return {"label": self.label, "unit": self.unit, "median": self.median,
                "samples": self.samples, "error": self.error}


@dataclass
class Row:
    key: str                        # "A/20000", "C/untar", ...
    title: str
    cowfs: Variant
    baselines: list = field(default_factory=list)
    target: str = ""
    verdict: str = "-"              # PASS, FAIL, ERROR, SKIP, -
    notes: dict = field(default_factory=dict)
    ratio_note: str = None          # replaces the ratio cell when the target is not a ratio
    extra: dict = None              # structured detail of the row (T: work/checkpoint per way)

    def ratio(self, baseline):
        if self.cowfs.ok and baseline.ok and baseline.median > 0:
            return self.cowfs.median / baseline.median
        return None

    def judge(self, passed):
        """Set the verdict from ``passed(row) -> bool`` unless a variant failed."""
        if self.cowfs.error and self.cowfs.error.startswith("not available"):
            self.verdict = "SKIP"
        elif not self.cowfs.ok or not all(b.ok for b in self.baselines):
            self.verdict = "ERROR"
        else:
            self.verdict = "PASS" if passed(self) else "FAIL"
        return self

    def to_json(self):
        return {
            "key": self.key, "title": self.title, "target": self.target,
            "verdict": self.verdict, "cowfs": self.cowfs.to_json(),
            "baselines": [b.to_json() for b in self.baselines],
            "ratios": {b.label: self.ratio(b) for b in self.baselines},
            "ratio_note": self.ratio_note,
            "notes": self.notes,
            **({"extra": self.extra} if self.extra is not None else {}),
        }


def attempt(variant, fn, *args, show_traceback=False):
    """Run ``fn(*args)``; any failure becomes the variant's error text so the
    rest of the run goes on.  Baseline failures also print a traceback: they
    mean the bench itself (or this machine) is broken."""
    try:
        return fn(*args)
    except (CowfsError, CommandFailed) as e:
        variant.fail(str(e))
    except Exception as e:  # noqa: BLE001 - recorded in the row, never fatal
        variant.fail(f"error: {type(e).__name__}: {e}")
        if show_traceback:
            warn(f"{variant.label} failed:\n{traceback.format_exc()}")
    return None


def geomean(values):
    values = [v for v in values if v and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


# --------------------------------------------------------------------------
# formatting


def fmt_number(x):
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_value(variant):
    if variant.error:
        return variant.error
    if not variant.samples:
        return "—"
    unit = variant.unit
    return f"{fmt_number(variant.median)}{unit}" if unit == "×" else f"{fmt_number(variant.median)} {unit}"


def fmt_ratio(ratio):
    """0.04 -> '25× faster', 1.8 -> '1.80× slower'."""
    if ratio is None:
        return "—"
    if ratio < 1:
        return f"{fmt_number(1 / ratio)}× faster"
    return f"{fmt_number(ratio)}× slower"
