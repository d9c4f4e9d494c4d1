"""ProductWorld: a synthetic two-domain product-seeking benchmark (``mall`` catalogue photos,
``live`` stream frames) in which grounding needs the query and the domain gap is real.

Public API::

    render_images(domain, indices, seed, config=None) -> list[dict]   # contract rows, no split
    iter_rows(domain, n_images, seed, config=None) -> Iterator[dict]
    ProductWorldConfig.from_dict({...})                                # YAML knobs per domain

Facts (default config, measured by ``bench/blind_baseline.py``):

- the catalogue is fixed and seed-independent: 12 categories x 10 colours x 5 patterns x 3
  finishes = 1800 items, ``item_id`` like ``mug-red-striped-glossy``; both domains and every seed
  draw from it uniformly, so at the paper's scale each item recurs in ~260 mall and ~55 live pairs;
- ``mall``: 320x240 catalogue photos, 1-3 products (2.2 mean), ~1.38 rows per image;
- ``live``: 320x180 stream frames, 3-6 products (4.5 mean), targets ~1.8x smaller (linear),
  ~1.48 rows per image;
- query-blind baselines (e.g. the largest product's box) per domain: ``bench/blind_baseline.py``;
- image ``i`` of domain ``d`` with seed ``s`` depends only on ``(s, d, i)`` and the config.

See ``catalogue`` (fixed item set), ``config`` (difficulty knobs), ``render`` (composition),
``queries`` (what a query says) and ``blind`` (query-blind baselines).
"""
from .catalogue import CATEGORIES, Item, catalogue, parse_item_id
from .config import DomainStyle, ProductWorldConfig
from .render import Product, Scene, iter_rows, render_images, render_scene, render_scenes

__all__ = [
    "CATEGORIES", "DomainStyle", "Item", "Product", "ProductWorldConfig", "Scene",
    "catalogue", "iter_rows", "parse_item_id", "render_images", "render_scene", "render_scenes",
]
