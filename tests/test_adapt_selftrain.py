"""Self-training shared by the Ray pipeline and the benchmark: the EMA teacher, the pseudo-box
loss terms, the query-sensitivity signal and the round functions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from date_core import batch as B
from date_core import build_model
from date_core.adapt import (EMATeacher, adaptation_step, build_views, concat_predictions, ema_decay_for,
                             label_target_set, predict_views, round_loss_weights, select_round, swap_partners)
from date_core.training.engine import build_optimizer
from date_core.training.losses import DateCriterion


def _tiny_batch(n: int = 6, seed: int = 0, with_boxes: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {B.PIXEL_VALUES: torch.randn(n, 3, 96, 96, generator=g),
             B.INPUT_IDS: torch.randint(5, 50, (n, 8), generator=g),
             B.ATTENTION_MASK: torch.ones(n, 8, dtype=torch.long),
             B.ITEM_KEY: torch.arange(n) % 3, B.IMAGE_KEY: torch.arange(n) // 2, B.PAIR_KEY: torch.arange(n)}
    if with_boxes:
        batch[B.BOXES] = torch.tensor([[0.5, 0.5, 0.3, 0.3]]).repeat(n, 1)
        batch[B.HAS_BOX] = torch.ones(n)
    return batch


def test_ema_decay_follows_the_run_length_or_the_config():
    short, long = ema_decay_for(200, {}), ema_decay_for(20000, {})
    assert 0.9 <= short < long <= 0.9999
    # half-life = 5% of the run: after that many steps the old weights weigh one half
    assert short ** (0.05 * 200) == pytest.approx(0.5, rel=1e-6)
    assert ema_decay_for(200, {"ema_decay": 0.99}) == 0.99
    with pytest.raises(ValueError):
        ema_decay_for(200, {"ema_decay": 1.0})


def test_alignment_waits_for_its_round_and_the_pipeline_rounds_follow():
    from date_core.config import default_config
    from date_core.adapt.round import round_config
    from date_core.runtime.pgda import alignment_terms, describe_round

    weights = {"retrieval": 1.0, "box_l1": 5.0, "pseudo_box_focus": 0.5, "align_marginal_image": 0.3,
               "align_conditional": 1.0, "adversarial": 0.1}
    late = {"align_from_round": 1}
    first, second, third = (round_loss_weights(weights, late, r) for r in range(3))
    assert first == {**weights, "align_marginal_image": 0.0, "align_conditional": 0.0, "adversarial": 0.0}
    assert second == weights and third == weights
    assert round_loss_weights(weights, {}, 0) == weights          # the default aligns from the start
    with pytest.raises(ValueError, match="align_from_round"):
        round_loss_weights(weights, {"align_from_round": -1}, 0)
    early = {"align_until_round": 1}  # only the first labelling teacher aligns
    assert round_loss_weights(weights, early, 0) == weights
    assert round_loss_weights(weights, early, 1) == first == round_loss_weights(weights, early, 2)
    assert round_loss_weights(weights, {"align_from_round": 1, "align_until_round": 2}, 1) == weights
    assert round_loss_weights(weights, {"align_from_round": 1, "align_until_round": 2}, 2) == first
    with pytest.raises(ValueError, match="align_until_round"):
        round_loss_weights(weights, {"align_from_round": 1, "align_until_round": 1}, 0)
    # the pipeline's rounds: round 1 trains (and is described) without alignment, round 2 with it
    cfg = default_config()
    cfg["loss"]["align_conditional"] = 1.0
    cfg["adapt"]["align_from_round"] = 1
    assert alignment_terms(round_config(cfg, 0)) == [] and alignment_terms(round_config(cfg, 1)) == ["align_conditional"]
    assert "align" not in describe_round(cfg, 0) and "align (mmd: conditional)" in describe_round(cfg, 1)
    assert cfg["loss"]["align_conditional"] == 1.0                 # the job's own config is left alone


def test_teacher_averages_trained_weights_and_ignores_frozen_ones():
    torch.manual_seed(0)
    student = build_model("tiny", vocab_size=50)
    student.text.backbone.embeddings.word_embeddings.weight.requires_grad_(False)
    teacher = EMATeacher(student, decay=0.75)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student)
    after = teacher.model.state_dict()
    name = "grounding.size.0.weight"
    assert torch.allclose(after[name], before[name] + 0.25)  # 0.75 * old + 0.25 * (old + 1)
    frozen = "text.backbone.embeddings.word_embeddings.weight"
    assert torch.equal(after[frozen], before[frozen])
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    assert teacher.updates == 1


def test_adaptation_step_updates_the_teacher_only_when_the_optimiser_steps():
    torch.manual_seed(0)
    student = build_model("tiny", vocab_size=50)
    teacher = EMATeacher(student, decay=0.5)
    opt = build_optimizer(student, {"lr": 1e-2})
    crit = DateCriterion(gather=False)
    first = adaptation_step(student, crit, _tiny_batch(), opt, target_batch=_tiny_batch(seed=1, with_boxes=False),
                            teacher=teacher, grad_accum=2, micro_step=0)
    assert first["stepped"] == 0.0 and teacher.updates == 0
    second = adaptation_step(student, crit, _tiny_batch(seed=2), opt, target_batch=_tiny_batch(seed=3, with_boxes=False),
                             teacher=teacher, grad_accum=2, micro_step=1)
    assert second["stepped"] == 1.0 and teacher.updates == 1
    assert "loss/target/retrieval" in second and "loss/target/confidence" not in second


def test_pseudo_boxes_have_their_own_weight_and_never_train_the_confidence_head():
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=50)
    batch = _tiny_batch()
    out = model(batch[B.PIXEL_VALUES], batch[B.INPUT_IDS], batch[B.ATTENTION_MASK])
    crit = DateCriterion({"pseudo_box_l1": 2.0, "pseudo_box_giou": 0.0, "pseudo_box_focus": 0.0}, gather=False)
    source_terms = crit(out, batch)
    pseudo_terms = crit(out, batch, pseudo=True)
    assert "confidence" in source_terms and "confidence" not in pseudo_terms
    assert set(pseudo_terms) == {"retrieval", "pseudo_box_l1", "pseudo_box_giou"}
    # the same boxes: the unweighted terms agree, the weights differ
    assert torch.allclose(pseudo_terms["pseudo_box_l1"], source_terms["box_l1"])
    total = crit.total({"pseudo_box_l1": pseudo_terms["pseudo_box_l1"]})
    assert torch.allclose(total, 2.0 * source_terms["box_l1"])
    model.zero_grad()
    crit.total(pseudo_terms).backward()
    conf_grads = [p.grad for p in model.grounding.conf.parameters()]
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in conf_grads)


def test_swap_partners_prefer_another_product_in_the_same_image():
    item = np.array([1, 2, 1, 3, 3])
    image = np.array([7, 7, 8, 9, 9])
    partner = swap_partners(item, image)
    assert partner[0] == 1 and partner[1] == 0       # same image, other product
    assert item[partner[2]] != 1                     # no other product in image 8: any other product
    assert partner[3] != 4 and item[partner[3]] != 3  # same image but the same product: not a swap
    assert (swap_partners(np.array([5, 5]), np.array([1, 1])) == -1).all()


class _QueryModel(torch.nn.Module):
    """Boxes at an x set by the query's first token (reads the query) or fixed (does not)."""

    def __init__(self, reads_query: bool) -> None:
        super().__init__()
        self.reads_query = reads_query
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, input_ids, attention_mask):
        n = pixel_values.shape[0]
        cx = (input_ids[:, 0].float() % 4) * 0.2 + 0.2 if self.reads_query else torch.full((n,), 0.5)
        boxes = torch.stack([cx, torch.full((n,), 0.5), torch.full((n,), 0.1), torch.full((n,), 0.1)], 1)
        emb = torch.nn.functional.normalize(torch.ones(n, 4), dim=-1)
        return {"pred_boxes": boxes + self.dummy, "pred_conf": torch.full((n,), 0.5), "image_emb": emb,
                "query_emb": emb}


def test_query_sensitivity_separates_a_model_that_reads_the_query():
    batch = _tiny_batch(n=4, with_boxes=False)
    batch[B.INPUT_IDS][:, 0] = torch.tensor([0, 1, 2, 3])
    batch[B.ITEM_KEY] = torch.tensor([0, 1, 2, 3])
    views = build_views(["identity", "hflip"])
    reading = predict_views(_QueryModel(True), batch, views)["sensitivity"]
    blind = predict_views(_QueryModel(False), batch, views)["sensitivity"]
    assert (reading == 1.0).all() and (blind == 0.0).all()   # disjoint boxes vs the same box
    assert "sensitivity" not in predict_views(_QueryModel(True), batch, views, sensitivity=False)


def test_label_target_set_is_select_round_over_predict_views():
    """The in-process labelling and the Ray actor pool share select_round: same input, same labels."""
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=50).eval()
    batches = [_tiny_batch(seed=s, with_boxes=False) for s in (0, 1)]
    for i, b in enumerate(batches):
        b[B.PAIR_KEY] = b[B.PAIR_KEY] + 10 * i
    cfg = {"keep_schedule": [0.5], "reliability": {"confidence": 1.0, "sensitivity": 1.0}, "focus_zoom": None}
    views = build_views(["identity", "hflip"])
    rnd = label_target_set(model, batches, views, 0, cfg)
    by_hand = select_round(concat_predictions([predict_views(model, b, views) for b in batches]), 0, cfg)
    assert np.array_equal(rnd.keep, by_hand.keep) and rnd.keep.sum() == 6
    np.testing.assert_allclose(rnd.reliability, by_hand.reliability)
    assert rnd.labels["pair_key"].tolist() == by_hand.labels["pair_key"].tolist()
    with pytest.raises(ValueError, match="sensitivity"):
        select_round({k: v for k, v in by_hand.predictions.items() if k != "sensitivity"}, 0, cfg)
