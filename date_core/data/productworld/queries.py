"""Query writing: which attributes a query mentions, and how it says them.

A query always names the target's category and colour, often its pattern and finish, and
always enough attributes to tell the target apart from every *different* product in the image
(a distractor of the same category and colour forces the pattern or finish into the query).
Products identical on every mentioned attribute (e.g. two copies of the item) are the
``alt_boxes``. Queries never use left/right or other positional words: the adaptation code
uses horizontal flips as a test-time view, and a flipped image must keep its query true.
"""
from __future__ import annotations

import numpy as np

from .catalogue import ATTRIBUTES, CATEGORY_WORDS, FINISH_WORDS, PATTERN_WORDS, Item

#: Words a query must never contain (checked by the tests on generated samples).
SPATIAL_WORDS = ("left", "right", "top", "bottom", "above", "below", "upper", "lower",
                 "front", "behind", "beside", "next to", "corner", "middle", "centre", "center")

_TITLE_SUFFIX = ("", "", "", " - free shipping", " | official store", " gift box", " hot sale",
                 " 2024 new", " genuine", " limited edition")
_TITLE_PREFIX = ("", "", "", "2024 new ", "official ", "hot sale ")
_TALK = (
    "the {d}", "the {d}", "can you show the {d}", "i want the {d}", "how much is the {d}",
    "link for the {d} please", "that {d}", "show me the {d} again", "is the {d} still in stock",
    "what size is the {d}", "add the {d} to my cart",
)
_HELD = ("{t} she's holding", "{t} in her hands", "{t} she is showing")
_TABLE = ("{t} on the table", "{t} on the desk")


def choose_mentions(rng: np.random.Generator, target: Item, others: list[Item],
                    style: str) -> set[str]:
    """Attributes the query names: category and colour always, pattern/finish sometimes, plus
    whatever is needed to exclude every product that is not an identical copy of the target."""
    mentioned = {"category", "colour"}
    p_pattern = 0.3 if target.pattern == "plain" else 0.75
    if rng.random() < p_pattern:
        mentioned.add("pattern")
    if rng.random() < (0.6 if style == "title" else 0.4):
        mentioned.add("finish")
    for other in others:
        if other == target:
            continue  # an identical copy cannot be excluded; it becomes an alt box
        if all(other.attribute(a) == target.attribute(a) for a in mentioned):
            differing = [a for a in ATTRIBUTES if a not in mentioned
                         and other.attribute(a) != target.attribute(a)]
            mentioned.add(differing[int(rng.integers(len(differing)))])
    return mentioned


def matches(item: Item, target: Item, mentioned: set[str]) -> bool:
    """Whether ``item`` answers a query naming ``mentioned`` attributes of ``target``."""
    return all(item.attribute(a) == target.attribute(a) for a in mentioned)


def _pick(rng: np.random.Generator, words: tuple[str, ...], canonical_p: float) -> str:
    if len(words) == 1 or rng.random() < canonical_p:
        return words[0]
    return words[1 + int(rng.integers(len(words) - 1))]


def write_query(rng: np.random.Generator, target: Item, mentioned: set[str], style: str,
                held: bool = False, on_table: bool = False) -> str:
    """The query text for ``target`` naming the ``mentioned`` attributes in ``style``."""
    title = style == "title"
    # Titles mostly use the catalogue word; speech spreads over synonyms (a text-side domain
    # gap, but every word also occurs in both styles).
    canon = 0.75 if title else 0.34
    cat = _pick(rng, CATEGORY_WORDS[target.category], canon)
    finish = _pick(rng, FINISH_WORDS[target.finish], canon) if "finish" in mentioned else ""
    adjectives, with_forms = PATTERN_WORDS[target.pattern]
    pattern_adj = _pick(rng, adjectives, canon) if "pattern" in mentioned else ""
    if title:
        words = [w for w in (finish, target.colour, pattern_adj, cat) if w]
        if rng.random() < 0.3:
            # Keyword-bag titles put the noun first: "Lumo mug red striped glossy".
            words = [cat] + [w for w in words if w != cat]
        text = f"{_TITLE_PREFIX[int(rng.integers(len(_TITLE_PREFIX)))]}{target.brand} " + " ".join(words)
        text += _TITLE_SUFFIX[int(rng.integers(len(_TITLE_SUFFIX)))]
        return text.title() if rng.random() < 0.5 else text
    use_with = "pattern" in mentioned and target.pattern != "plain" and rng.random() < 0.5
    core = " ".join(w for w in (finish, target.colour, "" if use_with else pattern_adj, cat) if w)
    if use_with:
        core += f" with {_pick(rng, with_forms, 0.5)}"
    if held and rng.random() < 0.5:
        core = _HELD[int(rng.integers(len(_HELD)))].format(t=core)
    elif on_table and rng.random() < 0.25:
        core = _TABLE[int(rng.integers(len(_TABLE)))].format(t=core)
    return _TALK[int(rng.integers(len(_TALK)))].format(d=core)


def product_phrase(rng: np.random.Generator, item: Item, brand_p: float = 0.35) -> str:
    """A loose marketing mention of ``item`` by its title words: always its colour and a
    category word (so a reader can tell which product is meant), sometimes its brand, pattern
    and finish ("Lumo red striped mug", "glossy blue cup")."""
    cat = _pick(rng, CATEGORY_WORDS[item.category], 0.6)
    pattern = ""
    if rng.random() < (0.2 if item.pattern == "plain" else 0.6):
        pattern = _pick(rng, PATTERN_WORDS[item.pattern][0], 0.6)
    finish = _pick(rng, FINISH_WORDS[item.finish], 0.6) if rng.random() < 0.3 else ""
    brand = item.brand if rng.random() < brand_p else ""
    return " ".join(w for w in (brand, finish, item.colour, pattern, cat) if w)
