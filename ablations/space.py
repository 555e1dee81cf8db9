"""Grid and search spaces as data: values you can print, store beside the results and override.

Following the tuning playbook, parameters are *scientific* (what the study asks about: freeze depth,
scheduler, epochs), *nuisance* (tuned away or averaged: learning rate, warmup, seed) or *fixed* (model, data).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import optuna.distributions as od
from transformers import SchedulerType

from core.config import SCHEDULERS, RunConfig
from core.errors import UsageError

# Every study stores these parameters with the same distributions, so a grid study and a search study on one
# storage hold comparable trials, and a second invocation with other lists never clashes with the first.
PARAM_DISTRIBUTIONS: dict[str, od.BaseDistribution] = {
    "freeze_depth": od.IntDistribution(0, 128),
    "scheduler": od.CategoricalDistribution(tuple(s.value for s in SchedulerType)),
    "epochs": od.IntDistribution(1, 1000),
    "seed": od.IntDistribution(0, 2**31 - 1),
    "learning_rate": od.FloatDistribution(1e-8, 1.0, log=True),
    "warmup_ratio": od.FloatDistribution(0.0, 1.0),
    "weight_decay": od.FloatDistribution(0.0, 10.0),
    "batch_size": od.IntDistribution(1, 65536),
    "max_train_samples": od.IntDistribution(1, 2**40),
}
SCIENTIFIC = ("freeze_depth", "scheduler", "epochs")


def parse_int_list(text: str, flag: str, low: int = 0, high: int | None = None) -> list[int]:
    """'0-6', '0,2,4' or '1,3-4' -> sorted unique ints, with a one-line error naming the flag."""
    values: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            start, _, stop = part.partition("-")
            first, last = int(start), int(stop) if stop else int(start)
            if last < first:
                raise ValueError
            values.update(range(first, last + 1))
    except ValueError:
        raise UsageError(f"{flag} {text!r} is invalid: use whole numbers, lists and ranges such as 0,2,4 or 0-6") \
            from None
    if not values:
        raise UsageError(f"{flag} {text!r} is empty: give at least one value")
    if min(values) < low or (high is not None and max(values) > high):
        allowed = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise UsageError(f"{flag} {text!r} is out of range: use values {allowed}")
    return sorted(values)


def parse_choices(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    values = [p.strip() for p in str(text).split(",") if p.strip()]
    for value in values:
        if value not in allowed:
            raise UsageError(f"{flag} value {value!r} is unknown: use one of {', '.join(allowed)}")
    if not values:
        raise UsageError(f"{flag} is empty: give at least one of {', '.join(allowed)}")
    return list(dict.fromkeys(values))


def parse_rates_by_depth(text: str, flag: str = "--lr-by-depth") -> dict[int, float]:
    """'0=3e-4,4=1e-3' or a file of `depth rate ...` lines (what `python -m ablations.lr_choice` prints) ->
    {depth: learning rate}."""
    path = Path(text).expanduser()
    if path.is_file():
        pairs = [line.split()[:2] for line in path.read_text().splitlines() if line.strip() and
                 not line.lstrip().startswith("#")]
        source = f"{flag} file {text!r}"
    elif "=" not in text:  # a file name, not pairs: "is invalid: use DEPTH=RATE pairs" hid that it was missing
        raise UsageError(f"{flag} {text!r} is neither a file nor DEPTH=RATE pairs: give the file python -m "
                         "ablations.lr_choice wrote (is the path right?) or pairs such as 0=3e-4,4=1e-3")
    else:
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        source = f"{flag} {text!r}"
    rates: dict[int, float] = {}
    try:
        for depth, rate in pairs:
            rates[int(depth)] = float(rate)
    except ValueError:
        raise UsageError(f"{source} is invalid: use DEPTH=RATE pairs such as 0=3e-4,4=1e-3, or a file of "
                         "'depth rate' lines from python -m ablations.lr_choice") from None
    if not rates or min(rates) < 0 or not all(0 < r < 1 for r in rates.values()):
        raise UsageError(f"{source} is invalid: give at least one depth (0 or more) with a rate in (0, 1)")
    return rates


@dataclass(frozen=True)
class Grid:
    """The cells of a grid: every combination of the scientific values, repeated over seeds."""
    freeze_depths: tuple[int, ...]
    schedulers: tuple[str, ...]
    epochs: tuple[int, ...]
    seeds: tuple[int, ...]

    def configs(self, base: RunConfig) -> list[RunConfig]:
        # Shallow depths first: a deeper frozen prefix is then derived from a cached shallower one.
        return [base.replace(freeze_depth=d, scheduler=s, epochs=e, seed=seed)
                for d, e, seed, s in itertools.product(self.freeze_depths, self.epochs, self.seeds, self.schedulers)]

    def describe(self) -> str:
        return (f"{len(self.freeze_depths)} depth(s) × {len(self.schedulers)} scheduler(s) × {len(self.epochs)} "
                f"epoch setting(s) × {len(self.seeds)} seed(s) = {self.size} runs")

    @property
    def size(self) -> int:
        return len(self.freeze_depths) * len(self.schedulers) * len(self.epochs) * len(self.seeds)


def study_params(config: RunConfig, varying: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The trial parameters for a config: the scientific ones, the seed, the learning rate and whatever varies."""
    names = list(dict.fromkeys((*SCIENTIFIC, "seed", "learning_rate", *varying)))
    values = config.to_dict()
    params = {n: values[n] for n in names if values.get(n) is not None}
    return params, {n: PARAM_DISTRIBUTIONS[n] for n in params}


@dataclass(frozen=True)
class SearchSpace:
    """What the search may choose. Scientific: depth, scheduler, epochs. Nuisance: learning rate, warmup."""
    freeze_depth: tuple[int, int] = (0, 6)
    schedulers: tuple[str, ...] = ("linear", "cosine")
    epochs: tuple[int, int] = (1, 4)
    learning_rate: tuple[float, float] = (1e-5, 5e-4)
    warmup_ratio: tuple[float, float] = (0.0, 0.2)

    def to_dict(self) -> dict:
        return {"freeze_depth": list(self.freeze_depth), "schedulers": list(self.schedulers),
                "epochs": list(self.epochs), "learning_rate": list(self.learning_rate),
                "warmup_ratio": list(self.warmup_ratio)}

    def describe(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, values: dict, defaults: "SearchSpace | None" = None) -> "SearchSpace":
        """A space from JSON-like values: keys left out keep `defaults`; ranges are [low, high] pairs."""
        known = {"freeze_depth", "schedulers", "epochs", "learning_rate", "warmup_ratio"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"search space key {unknown[0]!r} is unknown: use {', '.join(sorted(known))}")
        kinds = {"freeze_depth": int, "epochs": int, "learning_rate": float, "warmup_ratio": float}
        fields = {}
        for key, value in values.items():
            if key == "schedulers":
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
                fields[key] = tuple(value) if ok else None
            else:
                fields[key] = _pair(value, kinds[key])
            if fields[key] is None:
                example = {"freeze_depth": "[0, 6]", "schedulers": '["linear", "cosine"]', "epochs": "[1, 4]",
                           "learning_rate": "[1e-5, 5e-4]", "warmup_ratio": "[0, 0.2]"}[key]
                raise UsageError(f"search space {key} {json.dumps(value)} is invalid: use a list such as {example}")
        space = dataclasses.replace(defaults or cls(), **fields)
        space.validate()
        return space

    @classmethod
    def load(cls, path: str, defaults: "SearchSpace | None" = None) -> "SearchSpace":
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UsageError(f"cannot read search space {path!r}: {str(error).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise UsageError(f"search space {path!r} is invalid: use a JSON object such as {{\"epochs\": [1, 4]}}")
        return cls.from_dict(values, defaults)

    def validate(self, layers: int | None = None) -> None:
        low, high = self.freeze_depth
        if not 0 <= low <= high or (layers is not None and high > layers):
            limit = f"0 to {layers}" if layers is not None else "0 to the model's layer count"
            raise UsageError(f"search space freeze_depth {list(self.freeze_depth)} is invalid: use a range within "
                             f"{limit}, low first")
        parse_choices(",".join(self.schedulers), "search space schedulers", SCHEDULERS)
        if not 1 <= self.epochs[0] <= self.epochs[1]:
            raise UsageError(f"search space epochs {list(self.epochs)} is invalid: use a range like [1, 4]")
        if not 0 < self.learning_rate[0] <= self.learning_rate[1]:
            raise UsageError(f"search space learning_rate {list(self.learning_rate)} is invalid: use positive "
                             "bounds, low first")
        if not 0 <= self.warmup_ratio[0] <= self.warmup_ratio[1] < 1:
            raise UsageError(f"search space warmup_ratio {list(self.warmup_ratio)} is invalid: use fractions in "
                             "[0, 1), low first")


def _pair(value, kind: type) -> tuple | None:
    """[low, high] of whole numbers or of numbers as a typed pair; None when it is not one."""
    if not isinstance(value, (list, tuple)) or len(value) != 2 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    if kind is int and any(float(v) != int(v) for v in value):
        return None
    return kind(value[0]), kind(value[1])


def parse_range(text: str, flag: str, kind: type) -> tuple:
    """'0-6', '0,6' or '3' for whole numbers; '1e-5,5e-4' or '3e-5' for fractions -> (low, high)."""
    parts = text.split(",") if "," in text or kind is float else text.split("-")
    try:
        values = tuple(kind(part.strip()) for part in parts)
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        example = "0-6" if kind is int else "1e-5,5e-4"
        raise UsageError(f"{flag} {text!r} is invalid: use LOW{'-' if kind is int else ','}HIGH such as {example}")
    return values[0], values[-1]
