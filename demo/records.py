"""JSON records of the demo catalog in Amazon 2014/2018 shape: product metadata and reviews.

Titles, descriptions and brands use the item's category vocabulary and style words (see
``demo.vocabulary``), so the text encoder sees the same (category, style) group that the image
shows. Key order is fixed so the files are byte-for-byte reproducible.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import numpy as np

from demo.sequences import ItemSpec, UserSpec
from demo.vocabulary import STORE, STYLES, category_theme, colour_word


@dataclass(frozen=True)
class ItemText:
    """The human-facing description of one item."""

    title: str
    description: str
    brand: str
    categories: list[list[str]]
    price: float


def item_text(item: ItemSpec, n_categories: int, rng: np.random.Generator) -> ItemText:
    """Title "Crimson Striped Jigsaw Puzzle K42", a two-sentence description, brand, category path."""
    theme = category_theme(item.category)
    style = STYLES[item.style]
    colour = colour_word(item.category, n_categories)
    noun = theme.nouns[int(rng.integers(len(theme.nouns)))]
    # Brand follows the style most of the time: "category-ish", a weak extra hint like real brands.
    brand_index = item.style if rng.random() < 0.8 else int(rng.integers(len(theme.brands)))
    brand = theme.brands[brand_index % len(theme.brands)]
    model = f"{chr(ord('A') + int(rng.integers(26)))}{int(rng.integers(10, 100))}"
    f1, f2 = (theme.features[int(i)] for i in rng.choice(len(theme.features), size=2, replace=False))
    w1, w2 = (style.words[int(i)] for i in rng.choice(len(style.words), size=2, replace=False))
    description = (
        f"A {colour} {w1} {noun} with {f1} and {f2}. "
        f"Part of the {brand} {style.series}: {w2} design, {colour} finish."
    )
    subcategory = f"{style.adjective} {theme.name}"
    price = round(float(np.exp(rng.normal(np.log(20.0), 0.5))), 2)
    return ItemText(
        title=f"{colour.title()} {style.adjective} {noun.title()} {model}",
        description=description,
        brand=brand,
        categories=[[STORE, theme.name, subcategory]],
        price=price,
    )


def meta_line(asin: str, text: ItemText, image_url: str) -> str:
    """One line of ``meta_*.json.gz``: Amazon 2014 keys plus 2018's ``imageURLHighRes`` list."""
    record = {
        "asin": asin,
        "title": text.title,
        "description": text.description,
        "brand": text.brand,
        "categories": text.categories,
        "price": text.price,
        "imUrl": image_url,
        "imageURLHighRes": [image_url],
    }
    return json.dumps(record)


def review_time(day: int) -> tuple[int, str]:
    """Amazon's two timestamps for a day since the epoch: midnight UTC seconds and "MM DD, YYYY"."""
    date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
    return day * 86400, date.strftime("%m %d, %Y")


def review_line(user: UserSpec, item: ItemSpec, day: int, n_categories: int, rng: np.random.Generator) -> str:
    """One line of ``reviews_*_5.json.gz``; users rate items of their own style higher."""
    theme = category_theme(item.category)
    style = STYLES[item.style]
    colour = colour_word(item.category, n_categories)
    noun = theme.nouns[item.index % len(theme.nouns)]
    word = style.words[int(rng.integers(len(style.words)))]
    p_good = 0.85 if item.style == user.style else 0.65
    if rng.random() < p_good:
        overall = 5.0 if rng.random() < 0.6 else 4.0
        feature = theme.features[int(rng.integers(len(theme.features)))]
        text = f"Love this {colour} {word} {noun}. It has {feature}."
        summary = f"Great {noun}"
    else:
        overall = float(rng.choice([3.0, 2.0, 1.0], p=[0.6, 0.25, 0.15]))
        text = f"The {word} {noun} was not what I expected; the {colour} colour faded quickly."
        summary = f"Disappointing {noun}" if overall < 3 else f"Okay {noun}"
    unix, human = review_time(day)
    record = {
        "overall": overall,
        "verified": True,
        "reviewTime": human,
        "reviewerID": user.reviewer_id,
        "asin": item.asin,
        "reviewText": text,
        "summary": summary,
        "unixReviewTime": unix,
    }
    return json.dumps(record)
