"""Instance mode (Product1M-like): ProductWorld's multi-product queries + single-product gallery,
and the Freiburg groceries compositor; the plans and rows without Ray, one small prepare run
of each through ``pipelines/prepare.py`` with Ray."""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from date_core.data import io
from date_core.data.productworld import catalogue
from date_core.data.productworld.catalogue import CATEGORY_WORDS, parse_item_id
from date_core.data.productworld.instance import plan_instances, render_instance_rows
from date_core.data.schema import check_pair_schema
from date_core.data.summary import read_summary

from date_pipelines import prepare


def _mentions(caption: str, item_id: str) -> bool:
    """Whether ``caption`` names the item by its colour and one of its category words."""
    item = parse_item_id(item_id)
    text = caption.lower()
    has = lambda w: re.search(rf"\b{re.escape(w.lower())}\b", text) is not None  # noqa: E731
    return has(item.colour) and any(has(w) for w in CATEGORY_WORDS[item.category])


@pytest.fixture(scope="module")
def pw_rows():
    plan = plan_instances(40, 3, items=30, distractors=12)
    return plan, render_instance_rows(range(plan.total), plan)


def test_plan_uses_catalogue_items_and_the_gallery_covers_every_eval_instance(pw_rows):
    plan, rows = pw_rows
    items = {it.item_id for it in catalogue()}
    multi = [r for r in rows if r["domain"] == "multi"]
    gallery = [r for r in rows if r["split"] == "gallery"]
    single_train = [r for r in rows if r["domain"] == "single" and r["split"] == "train"]
    assert len(multi) == 40 and len(gallery) == len(plan.gallery) and len(single_train) == len(plan.single_train)
    gallery_ids = [r["item_id"] for r in gallery]
    assert len(set(gallery_ids)) == len(gallery_ids)
    queried = set()
    for r in multi:
        ids = r["instance_ids"]
        assert 2 <= len(ids) <= 4 and len(set(ids)) == len(ids) and set(ids) <= items
        assert r["item_id"] == ids[0] and r["box"] is None and r["alt_boxes"] is None
        queried.update(ids)
        if r["split"] in ("val", "test"):
            assert set(ids) <= set(gallery_ids), r["pair_id"]
    # Distractors: the gallery is larger than the set of items the queries show.
    assert set(gallery_ids) > queried and len(gallery_ids) == len(queried) + 12
    for r in gallery + single_train:
        assert r["instance_ids"] == [r["item_id"]] and r["item_id"] in items and len(r["box"]) == 4
    train_items = {x for r in multi if r["split"] == "train" for x in r["instance_ids"]}
    assert {r["item_id"] for r in single_train} == train_items
    assert {r["split"] for r in multi} == {"train", "val", "test"}


def test_captions_name_shown_products_and_sometimes_an_unshown_one(pw_rows):
    _, rows = pw_rows
    multi = [r for r in rows if r["domain"] == "multi"]
    for r in multi:
        assert r["mentioned"] and set(r["mentioned"]) <= set(r["instance_ids"])
        assert any(_mentions(r["query"], x) for x in r["instance_ids"]), r["query"]
        assert all(_mentions(r["query"], x) for x in r["mentioned"]), r["query"]
    unshown = [r for r in multi if r["unshown"] is not None]
    assert 0 < len(unshown) < len(multi)
    for r in unshown:
        assert r["unshown"] not in r["instance_ids"] and _mentions(r["query"], r["unshown"]), r["query"]
    # Captions name only some of the shown products at times (loose mentions, as Product1M's).
    assert any(len(r["mentioned"]) < len(r["instance_ids"]) for r in multi)
    print("[captions]", *(r["query"] for r in multi[:4]), sep="\n  ")


def test_deterministic_whatever_the_batch(pw_rows):
    plan, rows = pw_rows
    again = plan_instances(40, 3, items=30, distractors=12)
    assert again == plan
    some = [0, 7, 41, plan.total - 1]
    for g, row in zip(some, render_instance_rows(some, again)):
        assert row == rows[g]
    other = plan_instances(40, 4, items=30, distractors=12)
    assert other.queries != plan.queries


def test_prepare_synth_instance_writes_the_layout_with_instance_ids(ray_module, tmp_path):
    out = str(tmp_path / "pwi")
    assert prepare.main(["synth", "--instance", "--queries", "16", "--items", "12", "--distractors", "4",
                         "--seed", "0", "--out", out, "--vocab-size", "300", "--images-per-task", "8"]) == 0
    s = read_summary(out)
    plan = plan_instances(16, 0, items=12, distractors=4)
    assert (s["read"], s["kept"], s["rejected"]) == (plan.total, plan.total, 0)
    found = io.list_datasets(out)
    assert {("single", "gallery"), ("single", "train"), ("multi", "train")} <= set(found)
    assert {d for d, _ in found} == {"multi", "single"}
    for domain, split in found:
        for path in io.parquet_files(io.pairs_uri(out, domain, split)):
            check_pair_schema(pq.read_schema(path), path)
        table = io.read_table(out, domain, split)
        ids = table.column("instance_ids").to_pylist()
        assert all(ids) and table.column("split").to_pylist() == [split] * table.num_rows
        if domain == "single":
            assert all(i == [x] for i, x in zip(ids, table.column("item_id").to_pylist()))
    gallery = set(io.read_table(out, "single", "gallery").column("item_id").to_pylist())
    assert gallery == set(plan.gallery)
    assert (Path(out) / "tokenizer").is_dir()


# --- Freiburg groceries (real photos) -------------------------------------------------------

def test_voc_instance_plan_and_rows(groceries_dir):
    from date_core.data.voc_instance import plan_voc_instances, render_voc_instance_rows

    plan = plan_voc_instances(str(groceries_dir), 8, 1, gallery_per_class=2)
    assert len(plan.classes) == 25 and len(plan.gallery) == 50
    gallery_photos = {g["image_id"] for g in plan.gallery}
    rows = render_voc_instance_rows(range(8), plan)
    for r, q in zip(rows, plan.queries):
        ids = r["instance_ids"]
        assert 2 <= len(ids) <= 4 and len(set(ids)) == len(ids) and set(ids) <= set(plan.classes)
        assert sorted(ids) == sorted(c["label"] for c in q["crops"]) and r["item_id"] == ids[0]
        assert not {c["image_id"] for c in q["crops"]} & gallery_photos  # gallery photos are held out
        assert r["mentioned"] and set(r["mentioned"]) <= set(ids) and r["unshown"] not in ids
        assert any(w in r["query"] for w in (c.replace("_", " ") for c in ids))
    assert render_voc_instance_rows([3], plan)[0] == rows[3]
    print("[voc captions]", *(r["query"] for r in rows[:3]), sep="\n  ")


def test_prepare_voc_instance_on_real_photos(groceries_dir, ray_module, tmp_path):
    out = str(tmp_path / "groceries-instance")
    assert prepare.main(["voc", str(groceries_dir), "--instance", "--queries", "6", "--gallery-per-class", "1",
                         "--splits", "train=0.5,test=0.5", "--seed", "0", "--out", out,
                         "--vocab-size", "200"]) == 0
    s = read_summary(out)
    assert (s["read"], s["kept"], s["rejected"]) == (31, 31, 0)
    gallery = io.read_table(out, "single", "gallery")
    assert gallery.num_rows == 25 and all(len(b) == 4 for b in gallery.column("box").to_pylist())
    assert gallery.column("instance_ids").to_pylist() == [[x] for x in gallery.column("item_id").to_pylist()]
    multi = [io.read_table(out, "multi", sp) for d, sp in io.list_datasets(out) if d == "multi"]
    assert sum(t.num_rows for t in multi) == 6
    for t in multi:
        check_pair_schema(t.schema, out)
        assert all(2 <= len(i) <= 4 for i in t.column("instance_ids").to_pylist())
