"""PG-DA: unsupervised domain adaptation of product grounding (no ray, no mlflow here).

- :mod:`.aligner` — the domain aligner (``build_aligner``): MK-MMD or adversarial (GRL)
  alignment losses between a source and a target batch, as named loss terms.
- :mod:`.views` — augmented views with exact box mapping back (``build_views``).
- :mod:`.pseudo` — the pseudo box generator: ``predict_views`` per batch, then
  ``score_and_select`` over the whole target set, ``build_pseudo_labels``, and the one table
  format and join of pseudo boxes (``pseudo_table``, ``join_pseudo``).
- :mod:`.round` — the round engine (``RoundEngine``, ``round_config``) that the Ray workers and
  the benchmark both drive.
- :mod:`.selftrain` — self-training shared by the Ray pipeline and the benchmark: the EMA
  teacher, ``adaptation_step``, ``select_round``, ``label_target_set``,
  ``round_loss_weights`` (which terms train in which round).
- :mod:`.mmd`, :mod:`.grl` — the building blocks.
"""
from __future__ import annotations

from .aligner import (ADVERSARIAL, CONDITIONAL, MARGINAL_IMAGE, MARGINAL_QUERY, AdversarialAligner,
                      DomainAligner, MMDAligner, build_aligner, build_aligner_for_model)
from .grl import GradientReversal, grad_reverse, grl_coefficient
from .mmd import joint_mk_mmd, mk_mmd
from .pseudo import (PSEUDO_SCHEMA, TARGET_COLUMNS, build_pseudo_labels, concat_predictions, join_pseudo, kept_fraction,
                     predict_views, pseudo_lookup, pseudo_table, retrieval_hits, score_and_select, swap_partners,
                     target_rows)
from .selftrain import (EMATeacher, LabelRound, adaptation_step, ema_decay_for, focus_zoom_of, label_target_set,
                        round_loss_weights, select_round, zoom_settings)
from .views import Focus, View, build_view, build_views, random_zoom_out

__all__ = [
    "ADVERSARIAL", "CONDITIONAL", "MARGINAL_IMAGE", "MARGINAL_QUERY",
    "DomainAligner", "MMDAligner", "AdversarialAligner", "build_aligner", "build_aligner_for_model",
    "GradientReversal", "grad_reverse", "grl_coefficient", "mk_mmd", "joint_mk_mmd",
    "View", "build_view", "build_views",
    "predict_views", "concat_predictions", "retrieval_hits", "score_and_select", "kept_fraction",
    "build_pseudo_labels", "pseudo_table", "pseudo_lookup", "join_pseudo", "PSEUDO_SCHEMA",
    "TARGET_COLUMNS", "target_rows", "swap_partners", "LabelRound", "label_target_set",
    "select_round", "round_loss_weights", "EMATeacher", "ema_decay_for", "adaptation_step", "zoom_settings",
    "random_zoom_out", "Focus", "focus_zoom_of",
]
