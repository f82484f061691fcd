"""Words and colours of the demo catalog: what each category and style looks and reads like.

The planted signal lives here. A category owns a background hue (and the colour word that names
it), a noun list and brands; a style owns a shape in the image and an adjective in the text. Both
the image and the text of an item therefore say which (category, style) group it belongs to.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

STORE = "Demo Store"  # level 0 of every categories path, like "Toys & Games" in Amazon 2014/2018


@dataclass(frozen=True)
class CategoryTheme:
    """The vocabulary of one top-level category."""

    name: str
    nouns: tuple[str, ...]
    features: tuple[str, ...]  # phrases the description draws from
    brands: tuple[str, ...]


@dataclass(frozen=True)
class Style:
    """One visual/verbal style shared across categories: a shape and the words that describe it."""

    shape: str  # circle | square | triangle | stripes (demo.images draws it)
    adjective: str  # goes into the title: "Crimson Striped Jigsaw Puzzle"
    words: tuple[str, ...]  # synonyms the description and reviews draw from
    series: str  # subcategory suffix: "Striped Collection"


THEMES: tuple[CategoryTheme, ...] = (
    CategoryTheme(
        "Puzzles",
        ("jigsaw puzzle", "puzzle cube", "brain teaser", "floor puzzle", "maze puzzle"),
        ("interlocking pieces", "a satisfying challenge", "a picture to assemble", "hours of patient play"),
        ("PuzzleCraft", "Brainy Bits", "Piecewise"),
    ),
    CategoryTheme(
        "Dolls",
        ("fashion doll", "baby doll", "rag doll", "doll house", "doll outfit set"),
        ("brushable hair", "changeable outfits", "tiny accessories", "endless pretend play"),
        ("Dollhaven", "Little Belle", "Poppet & Co"),
    ),
    CategoryTheme(
        "Vehicles",
        ("race car", "dump truck", "train set", "toy helicopter", "fire engine"),
        ("free-rolling wheels", "a pull-back motor", "a sturdy chassis", "racing along the track"),
        ("SpeedWay", "Turbo Tots", "Axle Works"),
    ),
    CategoryTheme(
        "Board Games",
        ("board game", "card game", "dice game", "strategy game", "trivia game"),
        ("a folding game board", "turn-based strategy", "family game night", "cards and tokens"),
        ("Gamewright Lane", "Meeple Hall", "Tabletop Ten"),
    ),
    CategoryTheme(
        "Building Blocks",
        ("block set", "brick kit", "construction set", "magnetic tiles", "stacking blocks"),
        ("snap-together bricks", "a building guide", "creative construction", "stackable pieces"),
        ("BrickBound", "Stackwell", "Buildables"),
    ),
    CategoryTheme(
        "Plush Toys",
        ("teddy bear", "plush bunny", "stuffed dragon", "plush whale", "cuddle pillow"),
        ("soft fleece fabric", "embroidered eyes", "a huggable body", "bedtime cuddles"),
        ("Snugglepuff", "Cozy Critters", "Fluffworth"),
    ),
    CategoryTheme(
        "Art Supplies",
        ("crayon set", "paint kit", "sketch pad", "marker pack", "clay set"),
        ("washable colours", "a carry case", "bright pigments", "drawing and painting"),
        ("ColorNest", "Art Sprout", "Palette Pals"),
    ),
    CategoryTheme(
        "Science Kits",
        ("chemistry kit", "microscope", "robot kit", "crystal lab", "telescope"),
        ("step-by-step experiments", "safety goggles", "real lab tools", "hands-on discovery"),
        ("LabSprouts", "Curio Works", "Eureka Junior"),
    ),
    CategoryTheme(
        "Outdoor Play",
        ("kite", "water blaster", "jump rope", "sand set", "frisbee"),
        ("weatherproof plastic", "backyard fun", "summer afternoons", "active play outside"),
        ("SunnySide", "Backyard Co", "Play Trail"),
    ),
    CategoryTheme(
        "Musical Toys",
        ("toy drum", "xylophone", "keyboard", "ukulele", "maracas"),
        ("tuned notes", "a rhythm to follow", "first melodies", "a song book"),
        ("TuneTots", "Melody Lane", "Beat Buddies"),
    ),
)

STYLES: tuple[Style, ...] = (
    Style("circle", "Round", ("round", "circular", "dotted", "orb-shaped"), "Round Collection"),
    Style("square", "Boxy", ("boxy", "square", "blocky", "cube-shaped"), "Boxy Collection"),
    Style("triangle", "Pointed", ("pointed", "triangular", "angular", "peaked"), "Pointed Collection"),
    Style("stripes", "Striped", ("striped", "banded", "pinstriped", "stripy"), "Striped Collection"),
)

# One colour word per 30 degrees of hue, so distinct category hues read as distinct words.
_HUE_WORDS = (
    "crimson", "tangerine", "lemon", "lime", "emerald", "mint",
    "turquoise", "azure", "cobalt", "violet", "fuchsia", "rose",
)  # fmt: skip


def category_theme(index: int) -> CategoryTheme:
    """The theme of category ``index``; past the named ones a generic, still distinct, vocabulary."""
    if index < len(THEMES):
        return THEMES[index]
    name = f"Category {index + 1}"
    return CategoryTheme(
        name,
        (f"gizmo {index + 1}", f"gadget {index + 1}", f"widget {index + 1}"),
        (f"parts of kind {index + 1}", "a sturdy build", "everyday play"),
        (f"Maker {index + 1}", f"Works {index + 1}"),
    )


def category_hue(index: int, n_categories: int) -> float:
    """Hue in [0, 1) of category ``index``: evenly spaced around the colour wheel."""
    return (index / n_categories) % 1.0


def category_rgb(index: int, n_categories: int) -> tuple[int, int, int]:
    """The saturated background colour of a category."""
    r, g, b = colorsys.hsv_to_rgb(category_hue(index, n_categories), 0.85, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def colour_word(index: int, n_categories: int) -> str:
    """The word naming a category's colour ("crimson" for red, "cobalt" for blue...)."""
    return _HUE_WORDS[round(category_hue(index, n_categories) * 12) % 12]
