"""The pseudo box generator: per-batch view predictions, global selection, pseudo-label rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from date_core import batch as B
from date_core.adapt import (build_pseudo_labels, build_views, join_pseudo, kept_fraction, predict_views, pseudo_lookup,
                             pseudo_table, retrieval_hits, score_and_select)
from date_core.boxes import cxcywh_to_xyxy
from date_core.imaging import Letterbox, PAD_VALUE, to_pixel_values, xyxy_pixels_to_letterbox_cxcywh

from _localising import LocalisingModel

S = 32


def _batch(n: int = 6, confused=(1, 4)) -> dict:
    rng = np.random.default_rng(0)
    canvases, boxes = [], []
    for _ in range(n):
        # Even edges: the scale_0.5 view then puts every edge on a pixel edge (exact extents).
        x1, y1 = 2 * rng.integers(1, 7, size=2)
        w, h = 2 * rng.integers(3, 7, size=2)
        c = np.full((S, S, 3), PAD_VALUE, dtype=np.uint8)
        c[y1:y1 + h, x1:x1 + w] = 255
        canvases.append(c)
        boxes.append([(x1 + w / 2) / S, (y1 + h / 2) / S, w / S, h / S])
    ids = torch.zeros(n, 5, dtype=torch.long)
    ids[list(confused), 0] = 1
    ids[:, 1] = torch.arange(n)
    return {B.PIXEL_VALUES: torch.from_numpy(to_pixel_values(np.stack(canvases))), B.INPUT_IDS: ids,
            B.ATTENTION_MASK: torch.ones(n, 5, dtype=torch.long), B.PAIR_KEY: torch.arange(100, 100 + n),
            B.IMAGE_KEY: torch.arange(200, 200 + n), "true_boxes": np.asarray(boxes, dtype=np.float32)}


def test_kept_fraction_follows_the_schedule_and_repeats_the_last_value():
    assert [kept_fraction([0.3, 0.5, 0.7], r) for r in range(6)] == [0.3, 0.5, 0.7, 0.7, 0.7, 0.7]
    assert kept_fraction(0.4, 3) == 0.4
    for bad_schedule, bad_round in (([], 0), ([0.3, 1.5], 0), ([0.3], -1)):
        with pytest.raises(ValueError):
            kept_fraction(bad_schedule, bad_round)


def test_predict_views_maps_back_agrees_and_flags_the_disagreeing_pairs():
    batch = _batch()
    model = LocalisingModel().train()
    pred = predict_views(model, batch, build_views(["identity", "hflip", "scale_0.5"]))
    assert model.training  # mode restored
    n = 6
    assert pred["view_boxes"].shape == (n, 3, 4) and pred["box"].shape == (n, 4)
    for key in ("agreement", "confidence", "pair_key", "image_key"):
        assert pred[key].shape == (n,), key
    good = np.array([i not in (1, 4) for i in range(n)])
    # Views of a well-localised pair map back onto the true box (exact inverse mapping).
    np.testing.assert_allclose(pred["view_boxes"][good], np.repeat(batch["true_boxes"][good, None], 3, 1), atol=1e-5)
    np.testing.assert_allclose(pred["box"][good], batch["true_boxes"][good], atol=1e-5)
    np.testing.assert_allclose(pred["agreement"][good], 1.0, atol=1e-5)
    assert (pred["agreement"][~good] < 0.5).all()
    np.testing.assert_allclose(pred["confidence"], 0.8)
    # The median consensus is the two agreeing views' box, not pulled by the flipped outlier.
    np.testing.assert_allclose(pred["box"][~good], [[0.2, 0.5, 0.2, 0.4]] * 2, atol=1e-6)
    mean = predict_views(model, batch, build_views(["identity", "hflip", "scale_0.5"]), consensus="mean")
    assert np.abs(mean["box"][~good, 0] - 0.2).min() > 0.1


def test_embeddings_come_from_the_unaugmented_image_even_without_identity_view():
    batch = _batch()
    pred = predict_views(LocalisingModel(), batch, build_views(["hflip", "scale_0.5"]))
    expected = batch[B.PIXEL_VALUES].mean(dim=(1, 2, 3))
    np.testing.assert_allclose(pred["image_emb"][:, 0], expected.numpy(), atol=1e-6)


class _SourceSizedModel(LocalisingModel):
    """A teacher whose size head never draws a box under 0.25 of the side (it learned the source's
    scale): it finds the product but draws a small one too big, except when zoomed in."""

    def forward(self, pixel_values, input_ids, attention_mask):
        out = super().forward(pixel_values, input_ids, attention_mask)
        boxes = out["pred_boxes"]
        out["pred_boxes"] = torch.cat([boxes[:, :2], boxes[:, 2:].clamp(min=0.25)], dim=1)
        return out


def test_focus_zoom_lets_a_source_sized_teacher_draw_small_products_their_size():
    batch = _batch(confused=())
    true = batch["true_boxes"]                          # products 0.19-0.38 of the side
    views = build_views(["identity", "hflip"])
    plain = predict_views(_SourceSizedModel(), batch, views)
    zoomed = predict_views(_SourceSizedModel(), batch, views, focus_zoom=2.0)
    small = (true[:, 2:] < 0.25).any(axis=1)
    assert small.any()
    assert (plain["box"][small][:, 2:] >= 0.25 - 1e-6).all()       # too big without the zoom
    np.testing.assert_allclose(zoomed["box"], true, atol=1e-5)      # right with it, mapped back exactly
    np.testing.assert_allclose(zoomed["view_boxes"], np.repeat(true[:, None], 2, 1), atol=1e-5)
    # the embeddings stay those of the whole, unzoomed image
    np.testing.assert_allclose(zoomed["image_emb"], plain["image_emb"], atol=1e-6)
    # a zoom of 1 only moves each first centre to the middle: a teacher that finds the rectangle
    # wherever it is gives the same boxes. The config value is checked
    same = predict_views(_SourceSizedModel(), batch, views, focus_zoom=1.0)
    np.testing.assert_allclose(same["box"], plain["box"], atol=1e-6)
    from date_core.adapt import focus_zoom_of

    assert focus_zoom_of({"focus_zoom": None}) is None and focus_zoom_of({"focus_zoom": 1.5}) == 1.5
    with pytest.raises(ValueError, match="focus_zoom"):
        focus_zoom_of({"focus_zoom": 0.5})


def test_unreliable_pairs_are_dropped():
    batch = _batch(n=8, confused=(0, 5))
    pred = predict_views(LocalisingModel(), batch, build_views(["identity", "hflip", "scale_0.5"]))
    cfg = {"keep_schedule": [0.5, 0.75], "reliability": {"agreement": 1.0, "confidence": 1.0}}
    for round_index, n_keep in ((0, 4), (1, 6), (5, 6)):
        rel, keep = score_and_select(pred, round_index, cfg)
        assert keep.sum() == n_keep
        assert not keep[[0, 5]].any(), "a pair whose views disagree was kept"
        assert rel[[0, 5]].max() < rel[[1, 2, 3, 4, 6, 7]].min()
    # Even a schedule that keeps everything drops pairs at or below min_reliability.
    _, keep = score_and_select(pred, 0, {**cfg, "keep_schedule": [1.0], "min_reliability": 0.7})
    assert keep.sum() == 6 and not keep[[0, 5]].any()


def test_retrieval_signal_drops_queries_that_miss_their_own_image():
    n = 10
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 16)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    queries = images.copy()
    queries[[2, 7]] = -images[[2, 7]]          # these two queries point away from their own image
    pred = {"agreement": np.ones(n), "confidence": np.ones(n), "image_emb": images, "query_emb": queries,
            B.IMAGE_KEY: np.arange(n)}
    cfg = {"keep_schedule": [0.8], "reliability": {"agreement": 1.0, "confidence": 1.0, "retrieval": 1.0},
           "retrieval_topk": 1}
    rel, keep = score_and_select(pred, 0, cfg)
    assert keep.sum() == 8 and not keep[[2, 7]].any()
    np.testing.assert_allclose(rel[[2, 7]], 2 / 3)
    np.testing.assert_allclose(np.delete(rel, [2, 7]), 1.0)


def test_retrieval_hits_are_global_chunked_and_deduplicate_the_gallery():
    rng = np.random.default_rng(1)
    n_img = 40
    gallery = rng.normal(size=(n_img, 8)).astype(np.float32)
    image_key = np.repeat(np.arange(n_img), 2)                 # two queries per image
    image_emb = gallery[image_key]
    query_emb = image_emb + rng.normal(scale=1.0, size=image_emb.shape).astype(np.float32)
    full = retrieval_hits(query_emb, image_emb, image_key, k=3, chunk_size=10_000)
    for chunk in (1, 7, 33):
        assert np.array_equal(retrieval_hits(query_emb, image_emb, image_key, k=3, chunk_size=chunk), full)
    # Brute force over the distinct images: own image among the 3 best scores.
    scores = query_emb @ gallery.T
    rank = (scores > scores[np.arange(len(image_key)), image_key][:, None]).sum(1)
    assert np.array_equal(full, rank < 3)
    assert 0 < full.mean() < 1  # the case is neither trivial nor hopeless
    assert retrieval_hits(query_emb, image_emb, image_key, k=n_img).all()
    with pytest.raises(ValueError):
        retrieval_hits(query_emb, image_emb, image_key, k=0)


def test_pseudo_labels_carry_reliability_weights_and_pixel_boxes():
    pred = {"box": np.array([[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.2, 0.1], [0.6, 0.5, 0.4, 0.4]], np.float32),
            B.PAIR_KEY: np.array([11, 12, 13]), B.ORIG_SIZE: np.array([[200, 100], [100, 100], [50, 80]], np.float32)}
    rel = np.array([0.8, 0.2, 0.4], np.float32)
    keep = np.array([True, False, True])
    labels = build_pseudo_labels(pred, rel, keep, round_index=2)
    assert labels["pair_key"].tolist() == [11, 13]
    np.testing.assert_allclose(labels["box_weight"], [1.0, 0.5])
    assert labels["round"].tolist() == [2, 2]
    # The pixel boxes map forward again to the letterbox boxes (of any side).
    for box_px, box, (w, h) in zip(labels["box_xyxy"], labels["box"], pred[B.ORIG_SIZE][keep]):
        np.testing.assert_allclose(xyxy_pixels_to_letterbox_cxcywh(box_px, Letterbox(w, h, 224)), box, atol=1e-5)


def test_a_round_that_keeps_nothing_gives_empty_labels_and_no_targets():
    pred = {"box": np.full((3, 4), 0.5, np.float32), B.PAIR_KEY: np.array([1, 2, 3]),
            B.ORIG_SIZE: np.full((3, 2), 100.0, np.float32)}
    labels = build_pseudo_labels(pred, np.zeros(3, np.float32), np.zeros(3, bool), round_index=0)
    assert all(v.shape[0] == 0 for v in labels.values()) and labels["box_xyxy"].shape == (0, 4)
    pred.update(agreement=np.ones(3, np.float32), confidence=np.ones(3, np.float32),
                pair_id=np.array(["a", "b", "c"], dtype=object))
    table = pseudo_table(pred, np.zeros(3, np.float32), np.zeros(3, bool), labels, 0)
    assert table.num_rows == 3 and table["box"].null_count == 3 and pseudo_lookup(table) == {}
    rows = join_pseudo({"pair_id": np.array(["a", "b"], dtype=object)}, pseudo_lookup(table))
    assert np.isnan(rows["box"]).all() and rows["box_weight"].tolist() == [0.0, 0.0]


def test_the_pseudo_table_holds_what_build_pseudo_labels_made_and_joins_by_pair_id():
    pred = {"box": np.array([[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.2, 0.1], [0.6, 0.5, 0.4, 0.4]], np.float32),
            B.PAIR_KEY: np.array([11, 12, 13]), B.ORIG_SIZE: np.array([[200, 100], [100, 100], [50, 80]], np.float32),
            "pair_id": np.array(["a", "b", "c"], dtype=object), "agreement": np.array([0.9, 0.1, 0.5], np.float32),
            "confidence": np.array([0.7, 0.2, 0.6], np.float32)}
    rel, keep = np.array([0.8, 0.2, 0.4], np.float32), np.array([True, False, True])
    labels = build_pseudo_labels(pred, rel, keep, round_index=1)
    table = pseudo_table(pred, rel, keep, labels, 1)
    assert table["kept"].to_pylist() == [True, False, True] and table["box"][1].as_py() is None
    np.testing.assert_allclose(np.array(table["box"].to_pylist()[2]), labels["box_xyxy"][1])  # not recomputed
    assert table["box_weight"].to_pylist() == [1.0, 0.0, 0.5] and table["round"].to_pylist() == [1, 1, 1]
    rows = join_pseudo({"pair_id": np.array(["c", "b", "z"], dtype=object)}, pseudo_lookup(table))
    np.testing.assert_allclose(rows["box"][0], labels["box_xyxy"][1])
    assert np.isnan(rows["box"][1:]).all() and rows["box_weight"].tolist() == [0.5, 0.0, 0.0]


def test_predict_views_with_the_real_tiny_model():
    from date_core import build_model

    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=50).eval()
    size = model.config.image_size
    n, length = 4, 8
    batch = {B.PIXEL_VALUES: torch.randn(n, 3, size, size), B.INPUT_IDS: torch.randint(5, 50, (n, length)),
             B.ATTENTION_MASK: torch.ones(n, length, dtype=torch.long), B.PAIR_KEY: torch.arange(n),
             B.IMAGE_KEY: torch.arange(n)}
    pred = predict_views(model, batch, build_views(["identity", "hflip", "scale_0.9"]))
    with torch.no_grad():
        out = model(batch[B.PIXEL_VALUES], batch[B.INPUT_IDS], batch[B.ATTENTION_MASK])
    assert pred["view_boxes"].shape == (n, 3, 4) and pred["box"].shape == (n, 4)
    assert pred["image_emb"].shape == tuple(out["image_emb"].shape)
    # The identity view's boxes are the model's own boxes (clipped to the square).
    own = cxcywh_to_xyxy(out["pred_boxes"]).clamp(0, 1).numpy()
    np.testing.assert_allclose(cxcywh_to_xyxy(torch.from_numpy(pred["view_boxes"][:, 0])).numpy(), own, atol=1e-5)
    np.testing.assert_allclose(pred["confidence"], pred["confidence"].clip(0, 1))
    assert ((pred["agreement"] >= 0) & (pred["agreement"] <= 1)).all()
    rel, keep = score_and_select(pred, 0, {"keep_schedule": [0.5], "reliability": {"agreement": 1, "confidence": 1,
                                                                                     "retrieval": 1}})
    assert keep.sum() == 2 and rel.shape == (n,)


def test_label_target_set_keeps_the_reliable_pairs_and_reports_their_precision():
    from date_core.adapt import label_target_set

    batch = _batch(n=8, confused=(0, 5))
    batch[B.BOXES] = torch.from_numpy(batch.pop("true_boxes"))
    batch[B.HAS_BOX] = torch.ones(8)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    cfg = {"keep_schedule": [0.5, 0.75], "reliability": {"agreement": 1.0, "confidence": 1.0}}
    rnd = label_target_set(LocalisingModel(), halves, build_views(["identity", "hflip", "scale_0.5"]), 1, cfg,
                           keep_annotations=True)
    assert rnd.keep.sum() == 6 and not rnd.keep[[0, 5]].any()
    assert sorted(rnd.labels["pair_key"].tolist()) == [101, 102, 103, 104, 106, 107]
    summary = rnd.summary()
    assert summary["n_kept"] == 6 and summary["target_fraction"] == 0.75
    assert summary["precision@0.5"] == 1.0                  # the kept pairs are the well-localised ones
    assert summary["all_precision@0.5"] == pytest.approx(0.75)  # the two confused pairs miss
    # Without hidden boxes there is no precision, and selection is unchanged.
    plain = label_target_set(LocalisingModel(), halves, build_views(["identity", "hflip", "scale_0.5"]), 1, cfg)
    assert "precision@0.5" not in plain.summary() and np.array_equal(plain.keep, rnd.keep)


def test_signal_precision_tells_which_signal_finds_right_boxes():
    from date_core.adapt.selftrain import LabelRound

    # 10 pairs, 4 right boxes (0-3). Agreement ranks the right ones first, confidence the wrong
    # ones first: a reliability built on confidence would keep wrong boxes.
    gt = np.tile(np.array([[0.5, 0.5, 0.2, 0.2]], np.float32), (10, 1))
    box = gt.copy()
    box[4:, 0] = 0.1  # moved off the target: IoU 0
    right = np.arange(10) < 4
    pred = {"box": box, f"gt_{B.BOXES}": gt, f"gt_{B.HAS_BOX}": np.ones(10, np.float32),
            "agreement": np.where(right, 0.9, 0.2).astype(np.float32),
            "confidence": np.where(right, 0.1, 0.9).astype(np.float32)}
    reliability = ((pred["agreement"] + pred["confidence"]) / 2).astype(np.float32)
    rnd = LabelRound(0, pred, reliability, np.zeros(10, bool), {}, 0.3)
    prec = rnd.signal_precision(0.3)
    assert prec["agreement"] == 1.0 and prec["confidence"] == 0.0
    assert prec["all"] == pytest.approx(0.4) and "retrieval" not in prec
    assert prec["reliability"] == 0.0  # 0.55 (wrong) beats 0.5 (right)
    # Without hidden boxes there is nothing to measure.
    plain = {k: v for k, v in pred.items() if not k.startswith("gt_")}
    assert LabelRound(0, plain, reliability, np.zeros(10, bool), {}, 0.3).signal_precision(0.3) == {}


def test_label_threads_default_to_the_reserved_cpus_and_are_checked():
    pytest.importorskip("ray")
    from date_core.runtime.labeling import label_threads

    # Ray pins an actor's torch to its reserved CPUs (OMP_NUM_THREADS): null keeps that count
    assert label_threads({"label_threads": None, "label_cpus": 1}) == 1
    assert label_threads({"label_threads": None, "label_cpus": 0.25}) == 1
    assert label_threads({"label_cpus": 4}) == 4
    assert label_threads({"label_threads": 2, "label_cpus": 1}) == 2
    with pytest.raises(ValueError, match="label_threads"):
        label_threads({"label_threads": 0})


def test_sensitivity_pass_runs_when_asked_or_when_its_signal_is_weighed():
    from date_core.adapt.selftrain import sensitivity_pass_of
    from date_core.config import default_config

    assert sensitivity_pass_of(default_config()["adapt"]) is False    # logged-only signal: off
    assert sensitivity_pass_of({"sensitivity_pass": True}) is True
    assert sensitivity_pass_of({"reliability": {"confidence": 1.0, "sensitivity": 0.5}}) is True
    assert sensitivity_pass_of({"reliability": {"sensitivity": 0.0}}) is False
