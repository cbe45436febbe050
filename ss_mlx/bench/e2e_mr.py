"""E2E meaning representations (MRs): parse, render, and synthesize new ones from dev's values.

E2E dev has only 547 distinct MRs, too few prompts for the methods whose targets are the
baseline's own outputs (SS lossless, Medusa, the draft; issue 14). New MRs recombine what dev
shows: an attribute set drawn from dev's attribute sets with their dev frequency, each attribute
filled with one of the values dev has for it (uniformly: dev's value counts only say how many MRs
a venue got), rendered in dev's format and canonical attribute order.

Coupling kept from dev: priceRange and customer rating come as a pair seen in one dev MR when
both are present (E2E pairs word and number scales, e.g. cheap with 5 out of 5, never with low),
and ``near`` never names the venue itself.

Held-out test MRs are read only to drop collisions: a synthesized MR that equals a test MR
(or a dev MR, or an earlier synthesized one) is discarded, so no test prompt is ever trained on.
"""

from __future__ import annotations

import csv
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .datasets import DATASETS, DatasetError, data_root, missing_root_hint
from .tasks import get_task

# The E2E attributes in the order every dev and test MR lists them.
ATTRIBUTES = (
    "name",
    "eatType",
    "food",
    "priceRange",
    "customer rating",
    "area",
    "familyFriendly",
    "near",
)
_ORDER = {a: i for i, a in enumerate(ATTRIBUTES)}
_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*")
# Attempts per requested MR before giving up: collisions are rare while n is well below what
# dev's values allow, and the error tells the caller to ask for fewer.
_TRIES_PER_MR = 200

MR = tuple[tuple[str, str], ...]
"""(attribute, value) pairs in canonical E2E order; hashable, so it keys the collision sets."""


def parse_mr(text: str) -> MR:
    """The pairs of ``attr[value], attr[value], ...``; ValueError (one line) when malformed."""
    pairs: dict[str, str] = {}
    pos = 0
    while True:
        m = _ITEM.match(text, pos)
        if m is None:
            raise ValueError(f"expected 'attribute[value]' at character {pos + 1} of {text!r}")
        attr, value = m.group(1), m.group(2).strip()
        if attr not in _ORDER:
            raise ValueError(f"unknown attribute {attr!r} in {text!r}; E2E has {list(ATTRIBUTES)}")
        if attr in pairs:
            raise ValueError(f"attribute {attr!r} appears twice in {text!r}")
        if not value:
            raise ValueError(f"empty value for {attr!r} in {text!r}")
        pairs[attr] = value
        pos = m.end()
        if pos == len(text):
            break
        if text[pos] != ",":
            raise ValueError(f"expected ',' at character {pos + 1} of {text!r}")
        pos += 1
    return tuple(sorted(pairs.items(), key=lambda kv: _ORDER[kv[0]]))


def render_mr(mr: MR) -> str:
    """The dev file's text of an MR: ``name[The Vaults], eatType[pub], ...``."""
    return ", ".join(f"{attr}[{value}]" for attr, value in mr)


def read_mrs(path: str | Path) -> list[MR]:
    """Distinct MRs of an E2E CSV (``mr`` column), in file order; DatasetError names file:line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    mrs: dict[MR, None] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "mr" not in reader.fieldnames:
            raise DatasetError(f"{path}: expected a CSV with an 'mr' column (E2E format)")
        for row in reader:
            try:
                mrs.setdefault(parse_mr((row.get("mr") or "").strip()))
            except ValueError as e:
                raise DatasetError(f"{path}:{reader.line_num}: {e}") from None
    if not mrs:
        raise DatasetError(f"{path}: no MRs")
    return list(mrs)


@dataclass(frozen=True)
class MRStats:
    """What dev shows: attribute sets with their MR counts, values per attribute, price/rating
    pairs. Everything keeps first-seen order, so sampling from it is reproducible."""

    sets: tuple[tuple[tuple[str, ...], int], ...]
    values: dict[str, tuple[str, ...]]
    price_rating: tuple[tuple[str, str], ...]

    @classmethod
    def from_mrs(cls, mrs: Iterable[MR]) -> MRStats:
        sets: Counter[tuple[str, ...]] = Counter()
        values: dict[str, dict[str, None]] = {}
        pairs: dict[tuple[str, str], None] = {}
        for mr in mrs:
            sets[tuple(a for a, _ in mr)] += 1
            for attr, value in mr:
                values.setdefault(attr, {})[value] = None
            d = dict(mr)
            if "priceRange" in d and "customer rating" in d:
                pairs[(d["priceRange"], d["customer rating"])] = None
        if not sets:
            raise DatasetError("no MRs to take attribute sets and values from")
        return cls(tuple(sets.items()), {a: tuple(v) for a, v in values.items()}, tuple(pairs))

    def covers(self, mr: MR) -> bool:
        """Whether :meth:`sample` can produce ``mr``."""
        d = dict(mr)
        if tuple(d) not in dict(self.sets) or ("near" in d and d["near"] == d.get("name")):
            return False
        if "priceRange" in d and "customer rating" in d:
            if (d["priceRange"], d["customer rating"]) not in self.price_rating:
                return False
        return all(v in self.values[a] for a, v in mr)

    def possible(self) -> int:
        """How many distinct MRs :meth:`sample` can produce."""
        total = 0
        for attrs, _ in self.sets:
            n = 1
            rest = set(attrs)
            if {"priceRange", "customer rating"} <= rest:
                n *= len(self.price_rating)
                rest -= {"priceRange", "customer rating"}
            if {"name", "near"} <= rest:
                names, nears = self.values["name"], self.values["near"]
                n *= len(names) * len(nears) - len(set(names) & set(nears))
                rest -= {"name", "near"}
            total += n * math.prod(len(self.values[a]) for a in rest)
        return total

    def sample(self, rng: random.Random) -> MR:
        """One MR: an attribute set by dev frequency, then values (see the module docstring)."""
        attrs = rng.choices([a for a, _ in self.sets], [c for _, c in self.sets])[0]
        d = {a: rng.choice(self.values[a]) for a in attrs}
        if "priceRange" in d and "customer rating" in d:
            d["priceRange"], d["customer rating"] = rng.choice(self.price_rating)
        if "near" in d and "name" in d:
            nears = [v for v in self.values["near"] if v != d["name"]]
            d["near"] = rng.choice(nears)
        return tuple((a, d[a]) for a in attrs)


@dataclass
class Synthesis:
    """Synthesized MRs and the counts that say how much they add to dev."""

    mrs: list[MR]
    dev: int  # distinct dev MRs
    possible: int  # distinct MRs the recombination can produce (dev's own included)
    excluded: int  # dev and test MRs among those, never synthesized
    test_excluded: int  # of which test MRs
    draws: int  # samples taken, collisions and repeats included
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "synthesized": len(self.mrs),
            "dev_mrs": self.dev,
            "possible": self.possible,
            "new_possible": self.possible - self.excluded,
            "excluded_dev_or_test": self.excluded,
            "excluded_test": self.test_excluded,
            "draws": self.draws,
            "seed": self.seed,
            **self.meta,
        }


def synthesize_mrs(
    dev: Sequence[MR], n: int, seed: int = 0, exclude: Iterable[MR] = ()
) -> Synthesis:
    """``n`` distinct new MRs recombined from ``dev``'s, none in ``dev`` or ``exclude``."""
    if n < 0:
        raise DatasetError(f"number of synthetic MRs must be >= 0, got {n}")
    stats = MRStats.from_mrs(dev)
    dev_set = set(dev)
    test_set = set(exclude) - dev_set
    taken = dev_set | test_set
    blocked = sum(stats.covers(m) for m in taken)
    possible = stats.possible()
    if n > possible - blocked:
        raise DatasetError(
            f"asked for {n} synthetic E2E MRs, but dev's values recombine into only "
            f"{possible - blocked} new ones"
        )
    rng = random.Random(seed)
    out: list[MR] = []
    draws = 0
    while len(out) < n:
        if draws >= _TRIES_PER_MR * n:
            raise DatasetError(
                f"found only {len(out)} of {n} new E2E MRs in {draws} draws; ask for fewer"
            )
        draws += 1
        mr = stats.sample(rng)
        if mr not in taken:
            taken.add(mr)
            out.append(mr)
    return Synthesis(
        out, len(dev_set), possible, blocked, sum(stats.covers(m) for m in test_set), draws, seed
    )


def synthesize_e2e(
    n: int, seed: int = 0, root: str | Path | None = None, exclude: Iterable[MR] = ()
) -> Synthesis:
    """``n`` new MRs from the E2E task's dev file; its held-out test file is read only so that
    no synthesized MR equals a test MR. MRs in ``exclude`` (dev MRs held out for validation)
    are neither drawn from nor synthesized: the recombination sees only the remaining dev MRs."""
    task = get_task("e2e")
    base = data_root(root)
    paths = [base / task.train_file, base / task.eval_file]
    for rel, path in zip((task.train_file, task.eval_file), paths, strict=True):
        if not path.is_file():
            raise DatasetError(
                f"E2E MR synthesis reads {path}, which does not exist; "
                f"{missing_root_hint(root, rel)}"
            )
    held = set(exclude)
    dev = [m for m in read_mrs(paths[0]) if m not in held]
    test = read_mrs(paths[1])
    syn = synthesize_mrs(dev, n, seed, exclude=[*test, *held])
    syn.meta = {"dev_file": str(paths[0]), "excluded_file": str(paths[1])}
    if held:
        # synthesize_mrs counted the held-out MRs with the test ones; report them apart.
        stats = MRStats.from_mrs(dev)
        syn.test_excluded = sum(stats.covers(m) for m in set(test) - set(dev) - held)
        syn.meta["held_out_dev_mrs"] = len(held)
    return syn


def mr_prompts(mrs: Iterable[MR]) -> list[str]:
    """Prompts of MRs in the E2E task's template, as :func:`ss_mlx.bench.tasks.train_rows`
    makes them from dev."""
    template = DATASETS["e2e"].template
    return [template.format(mr=render_mr(mr)) for mr in mrs]
