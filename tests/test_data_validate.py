"""Row checks, split assignment and ingest of one batch (no Ray): every bad row gets its reason,
every good row is kept, and corrections are noted rather than silent."""
from __future__ import annotations

import io as _io
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from date_core.data import validate as V
from date_core.data.ingest import ingest_batch, records_table, split_staged
from date_core.data.schema import PAIR_SCHEMA, REJECTED_SCHEMA
from date_core.data.splits import assign_split, assign_splits, parse_fractions


def jpeg(w: int = 64, h: int = 48, fmt: str = "JPEG") -> bytes:
    out = _io.BytesIO()
    arr = np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(out, format=fmt)
    return out.getvalue()


def rec(i: int, **kw) -> dict:
    base = {"pair_id": f"p{i}", "image_id": f"img{i}", "image": jpeg(), "query": "a red mug",
            "box": [4.0, 4.0, 40.0, 30.0], "alt_boxes": None, "domain": "mall", "split": "train",
            "item_id": "mug", "source": f"test:{i}"}
    base.update(kw)
    return base


def test_box_checks():
    assert V.check_box([0, 0, 10, 10], 20, 20) == ([0, 0, 10, 10], False)
    assert V.check_box([-0.5, 0, 20.8, 10], 20, 20) == ([0, 0, 20, 10], True)  # within tolerance
    with pytest.raises(V.Rejection) as exc:
        V.check_box([0, 0, 25, 10], 20, 20)
    assert exc.value.reason == V.BOX_OUTSIDE_IMAGE
    for box in ([5, 5, 5, 9], [5, 9, 8, 3]):
        with pytest.raises(V.Rejection) as exc:
            V.check_box(box, 20, 20)
        assert exc.value.reason == V.DEGENERATE_BOX
    for bad, reason in (("1,2,3,4", V.BAD_TYPE), ([1, 2, 3], V.BAD_BOX), ([1, 2, "x", 4], V.BAD_TYPE),
                        ([1, 2, float("nan"), 4], V.BAD_BOX), ([1, True, 3, 4], V.BAD_TYPE),
                        ({"x1": 1, "y1": 2, "x2": 3, "y2": 4}, V.BAD_TYPE), (5, V.BAD_TYPE)):
        with pytest.raises(V.Rejection) as exc:
            V.coerce_box(bad)
        assert exc.value.reason == reason, bad
    assert V.coerce_box(None) is None


def test_query_and_split_checks():
    assert V.check_query("  红色 连衣裙 ") == "  红色 连衣裙 "  # kept verbatim
    for bad, reason in (("", V.EMPTY_QUERY), (" \t\n", V.EMPTY_QUERY), (None, V.MISSING_FIELD),
                        (12, V.BAD_TYPE), (["a"], V.BAD_TYPE)):
        with pytest.raises(V.Rejection) as exc:
            V.check_query(bad)
        assert exc.value.reason == reason
    assert V.check_split(None) is None and V.check_split("val") == "val"
    assert V.check_split("gallery") == "gallery"  # an instance-retrieval gallery (never hash-assigned)
    with pytest.raises(V.Rejection) as exc:
        V.check_split("training")
    assert exc.value.reason == V.BAD_SPLIT


def test_split_assignment_is_deterministic_and_follows_fractions():
    ids = [f"image-{i}" for i in range(20000)]
    first, again = assign_splits(ids), assign_splits(ids)
    assert (first == again).all()
    counts = Counter(first)
    assert abs(counts["train"] / len(ids) - 0.8) < 0.015
    assert abs(counts["val"] / len(ids) - 0.1) < 0.01 and abs(counts["test"] / len(ids) - 0.1) < 0.01
    fr = parse_fractions("train=0.5,test=0.5")
    assert fr == {"train": 0.5, "val": 0.0, "test": 0.5}
    assert {assign_split(i, fr) for i in ids[:500]} == {"train", "test"}
    for bad in ("train=0.5,val=0.1", "train=1.2,val=-0.2", "dev=1.0", "train"):
        with pytest.raises(ValueError):
            parse_fractions(bad)


def test_ingest_batch_rejects_each_bad_row_with_its_reason(tmp_path):
    on_disk = tmp_path / "a.jpg"
    on_disk.write_bytes(jpeg(80, 60))
    truncated = jpeg(200, 150)[:600]
    records = [
        rec(0),                                                        # kept
        {**rec(1), "image": None, "image_ref": str(on_disk), "box": [1, 1, 79, 59]},  # kept, loaded
        {**rec(2), "image": None, "image_ref": str(tmp_path / "missing.jpg")},
        rec(3, image=b"not an image at all"),
        rec(4, image=truncated),
        rec(5, box=[10, 10, 10, 30]),
        rec(6, box=[10, 10, 90, 30]),
        rec(7, query="   "),
        rec(8, query=""),
        rec(9, width=100),                                             # declared size != real
        rec(10, box=None),                                             # kept: unannotated
        rec(11, alt_boxes=[[1, 1, 20, 20], [5, 5, 5, 5], [0, 0, 500, 500]]),  # kept, 2 alts dropped
        rec(12, box=[-0.5, 2, 64.5, 40]),                              # kept, clipped
        rec(13, image=jpeg(30, 20, "BMP"), box=[1, 1, 10, 10]),        # kept, transcoded to PNG
        rec(14, split=None),
    ]
    staged = ingest_batch(records_table(records), io_threads=4)
    assert staged.num_rows == len(records)
    kept, rejected = split_staged(staged)
    assert kept.schema.equals(PAIR_SCHEMA) and rejected.schema.equals(REJECTED_SCHEMA)
    assert sorted(kept.column("pair_id").to_pylist()) == sorted(f"p{i}" for i in (0, 1, 10, 11, 12, 13))
    reasons = dict(zip(rejected.column("pair_id").to_pylist(), rejected.column("reason").to_pylist()))
    assert reasons == {
        "p2": V.MISSING_IMAGE, "p3": V.UNDECODABLE_IMAGE, "p4": V.UNDECODABLE_IMAGE,
        "p5": V.DEGENERATE_BOX, "p6": V.BOX_OUTSIDE_IMAGE, "p7": V.EMPTY_QUERY, "p8": V.EMPTY_QUERY,
        "p9": V.SIZE_MISMATCH, "p14": V.MISSING_FIELD,
    }
    # Rejected rows keep what could be read (query, ids, source, image bytes when they exist).
    row3 = {r["pair_id"]: r for r in rejected.to_pylist()}["p3"]
    assert row3["image"] == b"not an image at all" and row3["source"] == "test:3" and row3["query"] == "a red mug"
    rows = {r["pair_id"]: r for r in kept.to_pylist()}
    assert rows["p1"]["width"] == 80 and rows["p1"]["height"] == 60
    assert rows["p11"]["alt_boxes"] == [[1, 1, 20, 20]]
    assert rows["p12"]["box"] == [0, 2, 64, 40]
    assert Image.open(_io.BytesIO(rows["p13"]["image"])).format == "PNG"
    notes = {p: n for p, n, r in zip(staged.column("pair_id").to_pylist(), staged.column("notes").to_pylist(),
                                     staged.column("reason").to_pylist()) if r is None and n}
    assert notes == {"p11": "alt_dropped:degenerate_box;alt_dropped:box_outside_image", "p12": "clipped_box",
                     "p13": "transcoded:BMP"}


def test_instance_ids_are_checked_and_carried_when_asked():
    assert V.check_instance_ids(["AHC 黄金水", "AHC 黄金眼霜", "AHC 黄金眼霜"]) == ["AHC 黄金水", "AHC 黄金眼霜", "AHC 黄金眼霜"]
    assert V.check_instance_ids(None) is None and V.check_instance_ids([]) is None
    for bad in ("A#;#B", ["A", 3], ["A", " "], 7):
        with pytest.raises(V.Rejection) as exc:
            V.check_instance_ids(bad)
        assert exc.value.reason == V.BAD_TYPE, bad
    records = [rec(0, instance_ids=["B", "A", "B"]), rec(1), rec(2, instance_ids=["C"], query="")]
    staged = ingest_batch(records_table(records), io_threads=1)
    kept, rejected = split_staged(staged)
    assert kept.schema.equals(PAIR_SCHEMA)  # what a PAIR_SCHEMA writer expects: unchanged by default
    kept, _ = split_staged(staged, with_optional=True)
    assert kept.column_names[-1] == "instance_ids" and kept.schema.field("instance_ids").type == pa.list_(pa.string())
    assert dict(zip(kept.column("pair_id").to_pylist(), kept.column("instance_ids").to_pylist())) == {
        "p0": ["B", "A", "B"], "p1": None}  # order and repeats kept; null when the source has none
    assert rejected.column("instance_ids").to_pylist() == [["C"]]  # a rejected row keeps its labels
