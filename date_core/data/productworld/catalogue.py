"""The ProductWorld catalogue: a fixed, seed-independent set of compositional products.

An item is the combination ``category x colour x pattern x finish`` (12 x 10 x 5 x 3 = 1800
items). The catalogue does not depend on the generator's seed, so the same ``item_id`` (e.g.
``mug-red-striped-glossy``) appears in every seed, in both domains and in many images; that is
what makes retrieval relevance (same ``item_id``) meaningful. Each item also carries a brand
word chosen by a stable hash of its id, so a brand is a property of the item, not of a scene.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

#: Category -> words a query may use for it; the first is the canonical (title) word.
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "mug": ("mug", "cup", "coffee mug"),
    "bottle": ("bottle", "water bottle", "flask"),
    "shoe": ("sneaker", "shoe", "trainer"),
    "bag": ("handbag", "bag", "tote bag"),
    "lamp": ("desk lamp", "lamp", "table lamp"),
    "hat": ("hat", "sun hat", "bucket hat"),
    "phone": ("smartphone", "phone", "mobile phone"),
    "watch": ("wristwatch", "watch", "smart watch"),
    "tshirt": ("t-shirt", "tee", "shirt"),
    "chair": ("chair", "dining chair", "seat"),
    "vase": ("vase", "flower vase", "pot"),
    "headphones": ("headphones", "headset", "earphones"),
}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_WORDS)

#: Colour name -> sRGB. Chosen to stay nameable under the ``live`` colour cast.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 40),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 40),
    "green": (45, 160, 65),
    "blue": (35, 85, 205),
    "purple": (125, 55, 170),
    "pink": (245, 130, 185),
    "brown": (120, 70, 35),
    "black": (30, 30, 34),
    "white": (240, 240, 236),
}

#: Pattern -> (adjective forms, "with ..." forms) used by the query writer.
PATTERN_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plain": (("plain", "solid"), ("no pattern",)),
    "striped": (("striped",), ("stripes",)),
    "dotted": (("polka-dot", "dotted"), ("dots", "polka dots")),
    "checked": (("checked", "plaid"), ("checks", "a check pattern")),
    "zigzag": (("zigzag",), ("zigzags", "a zigzag pattern")),
}
PATTERNS: tuple[str, ...] = tuple(PATTERN_WORDS)

#: Finish (the surface/material attribute) -> adjectives. Drawn as flat / highlight / gradient.
FINISH_WORDS: dict[str, tuple[str, ...]] = {
    "matte": ("matte",),
    "glossy": ("glossy", "shiny"),
    "metallic": ("metallic", "chrome"),
}
FINISHES: tuple[str, ...] = tuple(FINISH_WORDS)

#: Brand-like words for title-style queries (invisible in the image: text noise, item-stable).
BRANDS: tuple[str, ...] = (
    "Lumo", "Kavo", "Zenta", "Orvi", "Pexa", "Mirabel", "Tokko", "Velun", "Sorano", "Quill",
    "Nordy", "Ameko", "Brisa", "Caldo", "Fenix", "Gova", "Hiro", "Ilsa", "Jovi", "Kento",
)


@dataclass(frozen=True)
class Item:
    """One catalogue product; ``item_id`` is the attribute combination."""

    category: str
    colour: str
    pattern: str
    finish: str

    @property
    def item_id(self) -> str:
        return f"{self.category}-{self.colour}-{self.pattern}-{self.finish}"

    @property
    def brand(self) -> str:
        digest = hashlib.blake2b(self.item_id.encode("utf-8"), digest_size=4).digest()
        return BRANDS[int.from_bytes(digest, "little") % len(BRANDS)]

    def attribute(self, name: str) -> str:
        """The value of attribute ``name`` (one of :data:`ATTRIBUTES`)."""
        return getattr(self, name)


#: Attribute names in the order they are drawn from the RNG.
ATTRIBUTES: tuple[str, ...] = ("category", "colour", "pattern", "finish")
_VALUES: dict[str, tuple[str, ...]] = {
    "category": CATEGORIES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "finish": FINISHES,
}


def attribute_values(name: str) -> tuple[str, ...]:
    """All values of attribute ``name``."""
    return _VALUES[name]


@lru_cache(maxsize=1)
def catalogue() -> tuple[Item, ...]:
    """Every item, in a fixed order (the full cartesian product of the attributes)."""
    return tuple(
        Item(c, col, p, f)
        for c in CATEGORIES for col in COLOURS for p in PATTERNS for f in FINISHES
    )


def parse_item_id(item_id: str) -> Item:
    """Inverse of :attr:`Item.item_id`; raises ``ValueError`` for an id not in the catalogue."""
    parts = item_id.split("-")
    if len(parts) != 4:
        raise ValueError(f"not a ProductWorld item id: {item_id!r}")
    item = Item(*parts)
    for name in ATTRIBUTES:
        if item.attribute(name) not in _VALUES[name]:
            raise ValueError(f"unknown {name} {item.attribute(name)!r} in item id {item_id!r}")
    return item
