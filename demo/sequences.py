"""The behaviour behind the demo catalog: items with (category, style), users who follow them.

A user's next item depends on the previous one: with probability ``P_SAME_GROUP`` it shares the
previous item's category and style, with ``P_SAME_CATEGORY`` only its category, otherwise it is a
jump (to the user's own taste or to the popular items). Within every draw items are weighted by a
Zipf-like popularity, so many items are rare: their ID embeddings see few updates while their text
and image still say which group they belong to. That is the signal a multimodal model can use and
an ID-only one cannot, and any sequential model beats most-popular.

The long-tail regime (``late_share`` > 0) adds items launched late: they appear only at a user's last
two reviews (the valid and test positions of leave-one-out), drawn from the previous item's group, so
their ID is never trained on a positive while their text and image say which group they belong to.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np

from demo.vocabulary import STYLES

P_SAME_GROUP = 0.7  # next item shares category and style with the previous one
P_SAME_CATEGORY = 0.15  # next item shares only the category
P_JUMP_TO_TASTE = 0.5  # of the remaining jumps, share that follows the user's own taste (else popularity)
ZIPF_EXPONENT = 2.0  # popularity ~ 1 / rank**a; users never repeat an item, which flattens the tail a lot
TIE_PROBABILITY = 0.25  # a user's next review lands on the same day as the previous one
MEAN_GAP_DAYS = 20.0  # otherwise days until the next review, geometric
FIRST_DAY = 16436  # 2015-01-01 as days since the Unix epoch
START_SPREAD_DAYS = 900  # users start within this many days of FIRST_DAY
MIN_LENGTH = 5  # every user starts with a 5-core-sized history
MAX_LENGTH = 50
P_LATE_AT_END = 0.2  # at a user's last two reviews, the chance the next item is a late launch of the group


@dataclass(frozen=True)
class ItemSpec:
    """One item's hidden truth: its (category, style) group and its popularity weight."""

    index: int
    asin: str
    category: int
    style: int
    popularity: float
    late: bool = False  # launched late: only ever a user's last or second-to-last item


@dataclass
class UserSpec:
    """One user's taste and chronological history: ``events`` holds (item index, day) pairs."""

    reviewer_id: str
    category_mix: np.ndarray  # [n_categories], sums to 1
    style: int
    events: list[tuple[int, int]] = field(default_factory=list)


def _random_ids(rng: np.random.Generator, n: int, prefix: str, length: int) -> list[str]:
    """``n`` distinct Amazon-looking ids: ``prefix`` + upper-case letters and digits."""
    alphabet = np.array(list(string.ascii_uppercase + string.digits))
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        cand = prefix + "".join(rng.choice(alphabet, size=length - len(prefix)))
        if cand not in seen:
            seen.add(cand)
            out.append(cand)
    return out


def make_items(rng: np.random.Generator, n_items: int, n_categories: int,
               exponent: float = ZIPF_EXPONENT, late_share: float = 0.0) -> list[ItemSpec]:
    """Items spread evenly over categories and styles, each with a Zipf-like popularity 1 / rank**exponent;
    ``late_share`` of them (the last ones of a shuffled order, so spread over the groups) launched late."""
    n_styles = len(STYLES)
    groups = np.arange(n_items) % (n_categories * n_styles)
    rng.shuffle(groups)
    ranks = rng.permutation(n_items)
    weights = 1.0 / (ranks + 1.0) ** exponent
    asins = _random_ids(rng, n_items, "B0", 10)
    late = np.zeros(n_items, dtype=bool)
    if late_share > 0:  # no draw without late items: the dense regime's catalog stays as it was
        late[rng.permutation(n_items)[: int(round(late_share * n_items))]] = True
    return [
        ItemSpec(i, asins[i], int(groups[i]) // n_styles, int(groups[i]) % n_styles, float(weights[i]),
                 bool(late[i]))
        for i in range(n_items)
    ]


class _Sampler:
    """Draws items by popularity from the pools of a group, a category or the whole catalog."""

    def __init__(self, items: list[ItemSpec], n_categories: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.popularity = np.array([it.popularity for it in items])
        self.by_group: dict[tuple[int, int], np.ndarray] = {}
        self.by_category: dict[int, np.ndarray] = {}
        for c in range(n_categories):
            self.by_category[c] = np.array([it.index for it in items if it.category == c], dtype=np.int64)
            for s in range(len(STYLES)):
                members = [it.index for it in items if it.category == c and it.style == s]
                self.by_group[(c, s)] = np.array(members, dtype=np.int64)
        self.everything = np.arange(len(items), dtype=np.int64)
        self.late = np.array([it.late for it in items], dtype=bool)

    def draw(self, pool: np.ndarray, exclude: set[int], late: bool | None = False) -> int | None:
        """One item of ``pool`` not in ``exclude``, by popularity; None when none is left.

        ``late``: False draws only items on sale from the start, True only late launches, None any.
        """
        free = np.array([i for i in pool.tolist() if i not in exclude and (late is None or self.late[i] == late)],
                        dtype=np.int64)
        if free.size == 0:
            return None
        p = self.popularity[free]
        return int(self.rng.choice(free, p=p / p.sum()))


def _next_item(sampler: _Sampler, items: list[ItemSpec], user: UserSpec, seen: set[int],
               at_end: bool = False) -> int:
    """The user's next item given the previous one (see the module docstring for the mix).

    ``at_end``: one of the user's last two reviews, where late launches are on sale.
    """
    rng = sampler.rng
    prev = items[user.events[-1][0]] if user.events else None
    if at_end and prev is not None and sampler.late.any() and rng.random() < P_LATE_AT_END:
        for pool in (sampler.by_group[(prev.category, prev.style)], sampler.by_category[prev.category]):
            item = sampler.draw(pool, seen, late=True)
            if item is not None:
                return item
    u = rng.random()
    pools: list[np.ndarray] = []
    if prev is not None and u < P_SAME_GROUP:
        pools.append(sampler.by_group[(prev.category, prev.style)])
    if prev is not None and u < P_SAME_GROUP + P_SAME_CATEGORY:
        other = sampler.by_category[prev.category]
        pools.append(np.array([i for i in other.tolist() if items[i].style != prev.style], dtype=np.int64))
    if prev is None or rng.random() < P_JUMP_TO_TASTE:
        category = int(rng.choice(len(user.category_mix), p=user.category_mix))
        style = user.style if rng.random() < 0.6 else int(rng.integers(len(STYLES)))
        pools.append(sampler.by_group[(category, style)])
        pools.append(sampler.by_category[category])
    pools.append(sampler.everything)
    for pool in pools:  # fall through when the user already has every item of a pool
        item = sampler.draw(pool, seen, late=False)
        if item is not None:
            return item
    raise RuntimeError("user has every item of the catalog; MAX_LENGTH must stay below n_items")


def make_users(
    rng: np.random.Generator, items: list[ItemSpec], n_users: int, n_categories: int, mean_length: float
) -> list[UserSpec]:
    """Simulate every user's chronological history (item, day), with same-day ties."""
    sampler = _Sampler(items, n_categories, rng)
    ids = _random_ids(rng, n_users, "A", 14)
    max_length = max(MIN_LENGTH, min(MAX_LENGTH, len(items) // 3))
    extra_p = 1.0 / max(mean_length - MIN_LENGTH + 1.0, 1.0)  # geometric extra length, mean = mean - MIN
    users: list[UserSpec] = []
    for reviewer_id in ids:
        mix = rng.dirichlet(np.full(n_categories, 0.4))
        user = UserSpec(reviewer_id, mix, int(rng.integers(len(STYLES))))
        length = min(max_length, MIN_LENGTH + int(rng.geometric(extra_p)) - 1)
        day = FIRST_DAY + int(rng.integers(0, START_SPREAD_DAYS))
        seen: set[int] = set()
        for pos in range(length):
            if pos > 0 and rng.random() >= TIE_PROBABILITY:
                day += int(rng.geometric(1.0 / MEAN_GAP_DAYS))
            item = _next_item(sampler, items, user, seen, at_end=pos >= length - 2)
            seen.add(item)
            user.events.append((item, day))
        users.append(user)
    return users
