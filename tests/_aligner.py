"""The domain aligner on its own, without a model's box head, for the aligner's unit tests."""
from __future__ import annotations

from typing import Any, Mapping

from date_core.adapt import DomainAligner, build_aligner

#: default.yaml turns protect_box (it needs the model's box head) and size_reweight on; the
#: aligner's own tests start from both off and turn them on where they test them
PLAIN = {"protect_box": False, "size_reweight": False}


def build_plain(cfg: Mapping[str, Any], **kwargs: Any) -> DomainAligner:
    """:func:`build_aligner` with :data:`PLAIN` under ``cfg``."""
    return build_aligner({**PLAIN, **cfg}, **kwargs)
