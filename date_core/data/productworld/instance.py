"""ProductWorld instance mode: a Product1M-like instance-level retrieval set.

Product1M's task: a shopper's *multi-product* image (a cosmetics set, a shop window) with its
marketing caption retrieves the *single-product* gallery items it shows. This mode writes the
same kind of data from the ProductWorld catalogue and renderer (:func:`render.compose_image`):

- ``multi/{train,val,test}``: one row per image showing 2-4 distinct catalogue items
  (``multi`` style: mall-like studio shots, products a bit smaller). ``query`` is a marketing
  caption naming some of the shown products by their title words (colour, category word,
  sometimes brand / pattern / finish: :func:`queries.product_phrase`) and, with probability
  ``unshown_prob``, also a product that is not in the image (captions mention products
  loosely); ``instance_ids`` = the shown items' ids, left to right (order of appearance);
  ``item_id`` = the first of them; ``box`` and ``alt_boxes`` null. Split by a hash of the
  image id, like every other source.
- ``single/gallery``: the retrieval gallery, one single-product image per item that any
  multi query shows (so every instance of every val/test query is in it) plus ``distractors``
  items no query shows; ``query`` = the item's title, ``instance_ids`` = ``[item_id]``, ``box``
  = the product's box.
- ``single/train``: ``single_per_item`` further single-product images (title + box) of every
  item shown by a multi/train query, for dual-encoder or pretraining training.

The multi queries draw their items from a *pool* of ``items`` catalogue items (so items
recur across queries, as Product1M's instances do); the distractors come from outside it.
Everything is a pure function of the seed and the sizes: :func:`plan_instances` fixes which
items go where, and row ``g`` of the plan (:func:`render_instance_rows`) depends only on the
plan and ``g``, so any Ray task split writes the same bytes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

from ..schema import GALLERY_SPLIT
from ..splits import DEFAULT_FRACTIONS, assign_split
from .catalogue import ATTRIBUTES, Item, catalogue, parse_item_id
from .config import DomainStyle, ProductWorldConfig, default_mall
from .queries import product_phrase, write_query
from .render import compose_image, scene_rng

MULTI_DOMAIN = "multi"
SINGLE_DOMAIN = "single"

_CAPTIONS = (
    "Shop the set: {list}",
    "{list} - hot sale, free shipping",
    "2024 new arrivals: {list}",
    "Gift box with {list}, limited edition",
    "Best sellers this week {list}",
    "Complete your look with {list}",
    "official store | {list} | buy more save more",
)
_UNSHOWN = (" - pairs well with the {x}", ", also see our {x}", " (the {x} sold separately)")


def default_multi() -> DomainStyle:
    """Multi-product query images: mall studio shots, 2-4 products a little smaller."""
    return dataclasses.replace(default_mall(), n_products=(2, 4), n_products_weights=None,
                               product_scale=(0.30, 0.52), second_query_prob=0.0)


def default_single() -> DomainStyle:
    """Single-product gallery / training images: one large product on a studio backdrop."""
    return dataclasses.replace(default_mall(), n_products=(1, 1), n_products_weights=None,
                               product_scale=(0.55, 0.85), second_query_prob=0.0)


def instance_styles(config: ProductWorldConfig | None = None) -> tuple[DomainStyle, DomainStyle]:
    """(multi style, single style): the config's ``multi`` / ``single`` domains where it has
    them (a world-config YAML may set ``multi: {...}``; such a domain starts from the mall
    defaults), else :func:`default_multi` / :func:`default_single`."""
    domains = config.domains if config is not None else {}
    multi = domains.get(MULTI_DOMAIN) or default_multi()
    single = domains.get(SINGLE_DOMAIN) or default_single()
    multi.validate(MULTI_DOMAIN)
    single.validate(SINGLE_DOMAIN)
    return multi, single


@lru_cache(maxsize=1)
def _catalogue_index() -> dict[Item, int]:
    return {item: i for i, item in enumerate(catalogue())}


def item_title(item: Item, seed: int) -> str:
    """The item's catalogue title (brand + every attribute, title noise): one per item and seed."""
    rng = scene_rng(seed, "instance-title", _catalogue_index()[item])
    return write_query(rng, item, set(ATTRIBUTES), "title")


@dataclass
class InstancePlan:
    """Which items every row shows. Rows are numbered ``0 .. total-1``: the multi queries,
    then the gallery, then the single-product training images."""

    seed: int
    #: Item ids drawn for each multi query (distinct; the image orders them left to right).
    queries: list[list[str]]
    #: Split of each multi query.
    splits: list[str]
    #: Gallery item ids: every item some query shows, then the distractors.
    gallery: list[str]
    #: Item id of each single/train image.
    single_train: list[str]
    #: Probability that a caption also mentions a product not in the image.
    unshown_prob: float = 0.4
    #: Gallery items that no query shows.
    distractors: int = 0

    @property
    def total(self) -> int:
        return len(self.queries) + len(self.gallery) + len(self.single_train)

    def counts(self) -> dict[str, Any]:
        per_split = {s: self.splits.count(s) for s in dict.fromkeys(self.splits)}
        return {"multi": per_split, "gallery": len(self.gallery), "distractors": self.distractors,
                "single_train": len(self.single_train), "unshown_prob": self.unshown_prob}

    def query_image_id(self, i: int) -> str:
        return f"pwi-{self.seed}-multi-{i}"


def plan_instances(queries: int, seed: int, *, items: int | None = None, distractors: int | None = None,
                   single_per_item: int = 1, fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
                   products: tuple[int, int] = (2, 4), same_category_prob: float = 0.35,
                   unshown_prob: float = 0.4) -> InstancePlan:
    """The plan of an instance-mode dataset with ``queries`` multi-product images.

    ``items``: size of the pool the queries draw from (default ``queries`` clipped to
    [8, 1200]: each item is then shown by ~3 queries); ``distractors``: gallery items outside
    the pool (default half the pool, at most what the catalogue has left);
    ``same_category_prob``: chance that each further product of a query shares the first
    one's category (telling them apart needs colour or pattern, as in a cosmetics set).
    """
    cat = catalogue()
    lo, hi = products
    if queries < 0 or single_per_item < 0:
        raise ValueError("queries and single_per_item must be >= 0")
    if not 1 <= lo <= hi <= 12:
        raise ValueError(f"products per query must satisfy 1 <= min <= max <= 12, got {products}")
    n_pool = items if items is not None else min(1200, max(8, queries))
    if not hi <= n_pool <= len(cat):
        raise ValueError(f"items (the query pool) must be in [{hi}, {len(cat)}], got {n_pool}")
    n_distract = distractors if distractors is not None else min(n_pool // 2, len(cat) - n_pool)
    if not 0 <= n_distract <= len(cat) - n_pool:
        raise ValueError(f"distractors must be in [0, {len(cat) - n_pool}] with a pool of {n_pool}, "
                         f"got {n_distract}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1A57]))
    order = rng.permutation(len(cat))
    pool = [cat[i] for i in sorted(order[:n_pool])]
    outside = [cat[i] for i in sorted(order[n_pool:n_pool + n_distract])]
    by_category: dict[str, list[Item]] = {}
    for item in pool:
        by_category.setdefault(item.category, []).append(item)

    plan_queries: list[list[str]] = []
    splits: list[str] = []
    for i in range(queries):
        q_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1A57, i]))
        n = int(q_rng.integers(lo, hi + 1))
        chosen = [pool[int(q_rng.integers(len(pool)))]]
        while len(chosen) < n:
            same = by_category[chosen[0].category]
            source = same if q_rng.random() < same_category_prob and len(same) > 1 else pool
            item = source[int(q_rng.integers(len(source)))]
            if item not in chosen:
                chosen.append(item)
        plan_queries.append([it.item_id for it in chosen])
        splits.append(assign_split(f"pwi-{seed}-multi-{i}", fractions))

    index = _catalogue_index()
    shown = sorted({x for ids in plan_queries for x in ids}, key=lambda x: index[parse_item_id(x)])
    gallery = shown + [it.item_id for it in outside]
    train_items = sorted({x for ids, s in zip(plan_queries, splits) if s == "train" for x in ids},
                         key=lambda x: index[parse_item_id(x)])
    single_train = [x for x in train_items for _ in range(single_per_item)]
    return InstancePlan(int(seed), plan_queries, splits, gallery, single_train,
                        unshown_prob=float(unshown_prob), distractors=n_distract)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def write_caption(rng: np.random.Generator, shown: Sequence[Item],
                  unshown_prob: float) -> tuple[str, list[Item], Item | None]:
    """A marketing caption for an image showing ``shown`` -> (caption, the shown items it
    names (at least one), the unshown item it also mentions or None). An unshown item never
    shares both colour and category with a shown one, so the mention is unambiguous."""
    k = int(rng.integers(1, len(shown) + 1))
    named = [shown[int(i)] for i in sorted(rng.choice(len(shown), size=k, replace=False))]
    phrases = [product_phrase(rng, it) for it in named]
    order = rng.permutation(len(phrases))
    phrases = [phrases[int(i)] for i in order]
    unshown = None
    if rng.random() < unshown_prob:
        taken = {(it.category, it.colour) for it in shown}
        cat = catalogue()
        while unshown is None or (unshown.category, unshown.colour) in taken:
            unshown = cat[int(rng.integers(len(cat)))]
    template = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))]
    if unshown is not None and rng.random() < 0.5:
        phrases.insert(int(rng.integers(len(phrases) + 1)), product_phrase(rng, unshown))
        text = template.format(list=_join(phrases))
    else:
        text = template.format(list=_join(phrases))
        if unshown is not None:
            text += _UNSHOWN[int(rng.integers(len(_UNSHOWN)))].format(x=product_phrase(rng, unshown))
    return text, named, unshown


def _single_row(plan: InstancePlan, item: Item, rng: np.random.Generator, style: DomainStyle,
                image_id: str, split: str) -> dict:
    data, products = compose_image(rng, [item], style)
    return {
        "pair_id": image_id, "image_id": image_id, "image": data, "width": style.width,
        "height": style.height, "query": item_title(item, plan.seed), "box": list(products[0].box),
        "alt_boxes": None, "domain": SINGLE_DOMAIN, "split": split, "item_id": item.item_id,
        "instance_ids": [item.item_id], "source": f"productworld-instance:seed={plan.seed}",
    }


def render_instance_rows(indices: Sequence[int], plan: InstancePlan,
                         config: ProductWorldConfig | None = None) -> list[dict]:
    """Records (contract rows with ``split``, ``instance_ids`` and ``source``) of rows
    ``indices`` of ``plan``. Multi rows also carry ``mentioned`` (ids of the shown items the
    caption names) and ``unshown`` (the id of the unshown item it mentions, or None): not
    contract columns (ingest drops them), there for tests and inspection."""
    multi_style, single_style = instance_styles(config)
    n_q, n_g = len(plan.queries), len(plan.gallery)
    rows: list[dict] = []
    for g in (int(i) for i in indices):
        if not 0 <= g < plan.total:
            raise IndexError(f"row {g} outside the plan's {plan.total} rows")
        if g < n_q:
            rng = scene_rng(plan.seed, "instance-multi", g)
            data, products = compose_image(rng, [parse_item_id(x) for x in plan.queries[g]], multi_style)
            shown = [p.item for p in sorted(products, key=lambda p: (p.box[0], p.box[1]))]
            caption, named, unshown = write_caption(rng, shown, plan.unshown_prob)
            image_id = plan.query_image_id(g)
            rows.append({
                "pair_id": image_id, "image_id": image_id, "image": data, "width": multi_style.width,
                "height": multi_style.height, "query": caption, "box": None, "alt_boxes": None,
                "domain": MULTI_DOMAIN, "split": plan.splits[g], "item_id": shown[0].item_id,
                "instance_ids": [it.item_id for it in shown],
                "source": f"productworld-instance:seed={plan.seed}",
                "mentioned": [it.item_id for it in named],
                "unshown": unshown.item_id if unshown is not None else None,
            })
        elif g < n_q + n_g:
            item = parse_item_id(plan.gallery[g - n_q])
            rng = scene_rng(plan.seed, "instance-gallery", _catalogue_index()[item])
            rows.append(_single_row(plan, item, rng, single_style,
                                    f"pwi-{plan.seed}-gallery-{item.item_id}", GALLERY_SPLIT))
        else:
            k = g - n_q - n_g
            item = parse_item_id(plan.single_train[k])
            rng = scene_rng(plan.seed, "instance-single", k)
            rows.append(_single_row(plan, item, rng, single_style, f"pwi-{plan.seed}-single-{k}", "train"))
    return rows
