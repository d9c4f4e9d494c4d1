"""ProductWorld: a synthetic two-domain product-seeking benchmark (``mall`` catalogue photos,
``live`` stream frames) in which grounding needs the query and the domain gap is real.

Public API::

    render_images(domain, indices, seed, config=None) -> list[dict]   # contract rows, no split
    iter_rows(domain, n_images, seed, config=None) -> Iterator[dict]
    ProductWorldConfig.from_dict({...})                                # YAML knobs per domain

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
