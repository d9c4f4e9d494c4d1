"""Knobs of the ProductWorld generator, one :class:`DomainStyle` per domain.

The ``live`` defaults are meant to be clearly harder than ``mall`` without being absurd: an
earlier trial with 3x smaller targets, heavy clutter, strong cast and noise left a mall-only
model at 0.00 acc@0.5 on live, which makes adaptation unmeasurable. Defaults here keep live
targets about 1.9x smaller (linear) than mall ones and every target at least ~17% of the model
input side at 96-128 px; every difficulty factor is a separate knob so it can be calibrated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

QUERY_STYLES = ("title", "colloquial")


@dataclass
class DomainStyle:
    """How one domain's images and queries look. Sizes are in pixels, scales are fractions of
    the image height (the shorter side)."""

    width: int = 320
    height: int = 240
    #: Inclusive range of products per image and the probability of each count (None = uniform).
    n_products: tuple[int, int] = (1, 3)
    n_products_weights: tuple[float, ...] | None = (0.2, 0.4, 0.4)
    #: Longest side of every product box as a fraction of the image height.
    product_scale: tuple[float, float] = (0.38, 0.70)
    #: Extra factor on the scale of the queried product (1.0 = same as every other product).
    target_scale_factor: float = 1.0
    #: Probability that a second, different product in the same image is also queried.
    second_query_prob: float = 0.5
    #: Distractor mix: each non-target product shares the target's category (different
    #: colour/pattern/finish), or its colour (different category), or is an exact copy (then
    #: its box is an ``alt_box``), or else is any random item.
    same_category_prob: float = 0.35
    same_colour_prob: float = 0.30
    duplicate_prob: float = 0.06
    #: Largest allowed overlap of two products, as intersection over the smaller box.
    max_overlap: float = 0.1
    #: Background: "studio" (light plain/gradient) or "room" (textured, shelves, table).
    background: str = "studio"
    #: Number of background clutter shapes (range), and texture noise amplitude (0-255).
    clutter: tuple[int, int] = (0, 0)
    texture: float = 0.0
    #: Draw a presenter figure, and the probability that one product is held in her hands.
    presenter: bool = False
    held_prob: float = 0.0
    #: Stream overlay (LIVE badge, comment bars).
    overlay: bool = False
    #: Colour cast strength (max; sampled per image in [0, max]), 0 = none.
    colour_cast: float = 0.0
    #: Brightness gain range applied to the whole frame.
    brightness: tuple[float, float] = (1.0, 1.0)
    #: Gaussian blur radius range in pixels.
    blur: tuple[float, float] = (0.0, 0.0)
    #: Gaussian noise sigma (0-255 scale), max; sampled per image in [0, max].
    noise: float = 0.0
    #: JPEG quality range of the encoded image.
    jpeg_quality: tuple[int, int] = (90, 95)
    #: Drop shadow under products (catalogue look).
    shadow: bool = True
    #: "title" (catalogue titles with brand words) or "colloquial" (spoken stream requests).
    query_style: str = "title"

    def validate(self, name: str) -> None:
        """Raise ``ValueError`` with a clear message for inconsistent knobs."""
        def bad(msg: str) -> ValueError:
            return ValueError(f"productworld.{name}: {msg}")

        if self.width < 64 or self.height < 64:
            raise bad(f"image size {self.width}x{self.height} is below 64 px")
        lo, hi = self.n_products
        if not 1 <= lo <= hi <= 12:
            raise bad(f"n_products must satisfy 1 <= min <= max <= 12, got {self.n_products}")
        if self.n_products_weights is not None:
            if len(self.n_products_weights) != hi - lo + 1 or min(self.n_products_weights) < 0:
                raise bad("n_products_weights needs one non-negative weight per product count")
            if sum(self.n_products_weights) <= 0:
                raise bad("n_products_weights sum to zero")
        s_lo, s_hi = self.product_scale
        if not 0.05 <= s_lo <= s_hi <= 0.95:
            raise bad(f"product_scale must lie in [0.05, 0.95], got {self.product_scale}")
        if not 0.3 <= self.target_scale_factor <= 2.0:
            raise bad(f"target_scale_factor {self.target_scale_factor} outside [0.3, 2]")
        for knob in ("second_query_prob", "same_category_prob", "same_colour_prob",
                     "duplicate_prob", "held_prob", "colour_cast"):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise bad(f"{knob} must be in [0, 1], got {getattr(self, knob)}")
        if self.same_category_prob + self.same_colour_prob + self.duplicate_prob > 1.0:
            raise bad("same_category_prob + same_colour_prob + duplicate_prob must be <= 1")
        if not 0.0 <= self.max_overlap < 1.0:
            raise bad(f"max_overlap must be in [0, 1), got {self.max_overlap}")
        if self.background not in ("studio", "room"):
            raise bad(f"background must be 'studio' or 'room', got {self.background!r}")
        if self.query_style not in QUERY_STYLES:
            raise bad(f"query_style must be one of {QUERY_STYLES}, got {self.query_style!r}")
        q_lo, q_hi = self.jpeg_quality
        if not 10 <= q_lo <= q_hi <= 100:
            raise bad(f"jpeg_quality must satisfy 10 <= min <= max <= 100, got {self.jpeg_quality}")
        if self.clutter[0] < 0 or self.clutter[0] > self.clutter[1]:
            raise bad(f"clutter range invalid: {self.clutter}")
        if self.blur[0] < 0 or self.blur[0] > self.blur[1] or self.noise < 0 or self.texture < 0:
            raise bad("blur, noise and texture must be non-negative ranges")


def default_mall() -> DomainStyle:
    """Catalogue photos: light studio background, 1-3 large products, title queries."""
    return DomainStyle()


def default_live() -> DomainStyle:
    """Stream frames: room background, presenter, 3-6 smaller products, camera artefacts."""
    return DomainStyle(
        width=320, height=180,
        n_products=(3, 6), n_products_weights=None,
        product_scale=(0.30, 0.48),
        second_query_prob=0.5,
        same_category_prob=0.35, same_colour_prob=0.30, duplicate_prob=0.06,
        max_overlap=0.25,
        background="room", clutter=(6, 12), texture=10.0,
        presenter=True, held_prob=0.6, overlay=True,
        colour_cast=0.25, brightness=(0.8, 1.1),
        blur=(0.0, 0.8), noise=6.0, jpeg_quality=(55, 80),
        shadow=False, query_style="colloquial",
    )


@dataclass
class ProductWorldConfig:
    """Per-domain styles. Domains other than ``mall`` and ``live`` may be added by name."""

    domains: dict[str, DomainStyle] = field(
        default_factory=lambda: {"mall": default_mall(), "live": default_live()})

    def style(self, domain: str) -> DomainStyle:
        """The style of ``domain``; ``KeyError`` names the known domains."""
        if domain not in self.domains:
            raise KeyError(f"unknown ProductWorld domain {domain!r}; known: {sorted(self.domains)}")
        return self.domains[domain]

    def validate(self) -> "ProductWorldConfig":
        for name, style in self.domains.items():
            style.validate(name)
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "ProductWorldConfig":
        """Build from YAML-style knobs, merged over the defaults.

        ``{"live": {"noise": 3.0, "n_products": [3, 5]}}`` changes two live knobs. A domain
        that is neither ``mall`` nor ``live`` starts from the mall defaults, or from the
        domain named by its ``base`` key (``{"live_easy": {"base": "live", "blur": [0, 0]}}``).
        Unknown knobs raise ``ValueError``.
        """
        cfg = cls()
        known = {f.name: f for f in dataclasses.fields(DomainStyle)}
        for domain, knobs in (data or {}).items():
            knobs = dict(knobs or {})
            base_name = knobs.pop("base", domain if domain in cfg.domains else "mall")
            if base_name not in cfg.domains:
                raise ValueError(f"productworld.{domain}: unknown base domain {base_name!r}")
            style = dataclasses.replace(cfg.domains[base_name])
            for key, value in knobs.items():
                if key not in known:
                    raise ValueError(f"productworld.{domain}: unknown knob {key!r}; "
                                     f"known: {sorted(known)}")
                # YAML gives lists where the dataclass keeps tuples (ranges stay hashable).
                setattr(style, key, tuple(value) if isinstance(value, list) else value)
            cfg.domains[domain] = style
        return cfg.validate()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain-dict view (for logging as params or writing next to a dataset)."""
        return {name: dataclasses.asdict(style) for name, style in self.domains.items()}
