"""prepare end to end on real Ray (2 CPUs), a real S3 endpoint (moto server) and the real grocery
photos: datasets read back identical from local and s3, bad rows land in rejected/ with their
reason and exact counts, and the Ray Data read path feeds BatchTransform."""
from __future__ import annotations

import io as _io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from date_core import batch as B
from date_core.data import io, storage
from date_core.data import validate as V
from date_core.data.splits import assign_split
from date_core.data.summary import read_summary
from date_core.data.transforms import BatchTransform

from date_pipelines import prepare

pytestmark = pytest.mark.integration


def jpeg(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    out = _io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def read_all(root: str) -> dict:
    """Every (domain, split) table of a dataset, rows sorted by pair_id."""
    return {key: io.read_table(root, *key).sort_by("pair_id") for key in io.list_datasets(root)}


@pytest.fixture(scope="module")
def synth_pair(s3_endpoint, ray_module, tmp_path_factory):
    """The same ProductWorld run written to a local folder and to s3://date-test/."""
    local = str(tmp_path_factory.mktemp("synth") / "pw")
    remote = f"s3://date-test/synth-{uuid.uuid4().hex[:8]}"
    args = ["--mall", "14", "--live", "8", "--seed", "3", "--vocab-size", "400", "--images-per-task", "8"]
    assert prepare.main(["synth", *args, "--out", local]) == 0
    assert prepare.main(["synth", *args, "--out", remote]) == 0
    return local, remote


def test_synth_local_and_s3_read_back_identical(synth_pair):
    local, remote = synth_pair
    a, b = read_all(local), read_all(remote)
    assert set(a) == set(b) and {d for d, _ in a} == {"mall", "live"}
    for key in a:
        assert a[key].equals(b[key]), key
    rows = [r for t in a.values() for r in t.select(["image_id", "split", "domain"]).to_pylist()]
    assert len({r["image_id"] for r in rows if r["domain"] == "mall"}) == 14
    assert len({r["image_id"] for r in rows if r["domain"] == "live"}) == 8
    assert all(r["split"] == assign_split(r["image_id"]) for r in rows)  # an image never straddles
    sl, sr = read_summary(local), read_summary(remote)
    def counts(summary: dict) -> dict:  # file names carry a random tag; the counts must agree
        return {d: {s: {k: v for k, v in c.items() if k != "files"} for s, c in splits.items()}
                for d, splits in summary["per_domain_split"].items()}

    assert counts(sl) == counts(sr)
    assert sl["kept"] == sum(t.num_rows for t in a.values()) and sl["rejected"] == 0
    # Small data: one file per split; the tokenizer travels with the dataset, on s3 too.
    assert all(len(c["files"]) == 1 for v in sr["per_domain_split"].values() for c in v.values())
    assert storage.exists(f"{remote}/tokenizer/tokenizer.json")


def test_ray_read_path_feeds_batch_transform_from_s3(synth_pair):
    from date_core.runtime.dataio import read_pairs

    _, remote = synth_pair
    ds = read_pairs(remote, "mall", "train")
    plain = io.read_table(remote, "mall", "train")
    assert ds.count() == plain.num_rows
    out = ds.map_batches(BatchTransform, fn_constructor_args=(f"{remote}/tokenizer", 64, 16),
                         batch_format="numpy", batch_size=8, concurrency=1).take_batch(plain.num_rows)
    assert out[B.PIXEL_VALUES].shape == (plain.num_rows, 3, 64, 64) and out[B.HAS_BOX].all()
    # Same rows through plain Python give the same model batch (Ray adds nothing, drops nothing).
    ref = BatchTransform(f"{remote}/tokenizer", 64, 16)(io.to_numpy_batch(plain))
    order, ref_order = np.argsort(out[B.PAIR_KEY]), np.argsort(ref[B.PAIR_KEY])
    for key in (B.PIXEL_VALUES, B.BOXES, B.INPUT_IDS, B.ALT_BOXES):
        np.testing.assert_array_equal(out[key][order], ref[key][ref_order], err_msg=key)


def test_write_pairs_roundtrip(synth_pair, tmp_path):
    import ray

    from date_core.runtime.dataio import read_pairs, to_model_batches, write_pairs

    local, _ = synth_pair
    source = io.read_table(local, "live", "train").drop_columns(["split"])  # write_pairs adds it
    write_pairs(ray.data.from_arrow(source), str(tmp_path), "live", "val", shard_mb=1)
    back = io.read_table(str(tmp_path), "live", "val").sort_by("pair_id")
    assert back.column("split").to_pylist() == ["val"] * source.num_rows
    assert back.drop_columns(["split"]).equals(source.sort_by("pair_id"))
    # The task-based transform (safe when every CPU is held) equals plain Python on the same rows.
    out = to_model_batches(read_pairs(str(tmp_path), "live", "val"), f"{local}/tokenizer", 32, 8,
                           batch_size=4).take_batch(source.num_rows)
    ref = BatchTransform(f"{local}/tokenizer", 32, 8)(io.to_numpy_batch(back))
    assert len(out[B.PAIR_KEY]) == source.num_rows
    order, ref_order = np.argsort(out[B.PAIR_KEY]), np.argsort(ref[B.PAIR_KEY])
    for key in (B.PIXEL_VALUES, B.BOXES, B.ALT_MASK, B.ATTENTION_MASK):
        np.testing.assert_array_equal(out[key][order], ref[key][ref_order], err_msg=key)


def test_manifest_with_bad_rows_keeps_every_valid_row(s3_endpoint, ray_module, tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(64, 48, i))
    (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    remote_img = f"s3://date-test/man-{uuid.uuid4().hex[:6]}/r.jpg"
    storage.write_bytes(remote_img, jpeg(50, 40, 9))
    good = {"query": "a mug", "box": [2, 2, 30, 30], "domain": "mall", "item_id": "mug"}
    rows = [
        {**good, "image": "img/0.jpg", "pair_id": "ok0"},
        {**good, "image": "img/1.jpg", "pair_id": "ok1", "alt_boxes": [[1, 1, 9, 9]], "split": "test"},
        {**good, "image": "img/2.jpg", "pair_id": "ok2", "box": None, "domain": "live"},
        {**good, "image": remote_img, "pair_id": "ok3"},                              # image on s3
        {**good, "image": "img/3.jpg", "pair_id": "ok4", "query": "红色 马克杯"},
        {**good, "image": "img/missing.jpg", "pair_id": "bad_missing"},
        {**good, "image": "img/broken.jpg", "pair_id": "bad_decode"},
        {**good, "image": "img/0.jpg", "pair_id": "bad_degenerate", "box": [5, 5, 5, 20]},
        {**good, "image": "img/0.jpg", "pair_id": "bad_outside", "box": [5, 5, 200, 20]},
        {**good, "image": "img/0.jpg", "pair_id": "bad_empty", "query": " \t "},
        {**good, "image": "img/0.jpg", "pair_id": "bad_type", "box": {"x": 1}},
        {**good, "image": "img/1.jpg", "pair_id": "ok0"},                              # duplicate id
        {**good, "image": "img/0.jpg", "pair_id": "bad_missing_item", "item_id": None},
    ]
    lines = [json.dumps(r).encode() for r in rows] + [b'{"image": "img/0.jpg", "query": "\xff\xfe"}']
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_bytes(b"\n".join(lines))
    out = f"s3://date-test/man-out-{uuid.uuid4().hex[:6]}"
    assert prepare.main(["manifest", str(manifest), "--out", out, "--vocab-size", "200"]) == 0

    summary = read_summary(out)
    assert (summary["read"], summary["kept"], summary["rejected"]) == (14, 5, 9)
    assert summary["rejected_by_reason"] == {
        V.BAD_TYPE: 1, V.DEGENERATE_BOX: 1, V.BOX_OUTSIDE_IMAGE: 1, V.DUPLICATE_PAIR_ID: 1,
        V.EMPTY_QUERY: 1, V.INVALID_UTF8: 1, V.MISSING_FIELD: 1, V.MISSING_IMAGE: 1, V.UNDECODABLE_IMAGE: 1}
    kept = {r["pair_id"]: r for t in read_all(out).values() for r in t.to_pylist()}
    assert sorted(kept) == ["ok0", "ok1", "ok2", "ok3", "ok4"]
    assert kept["ok1"]["split"] == "test" and kept["ok1"]["alt_boxes"] == [[1, 1, 9, 9]]
    assert kept["ok2"]["domain"] == "live" and kept["ok2"]["box"] is None
    assert (kept["ok3"]["width"], kept["ok3"]["height"]) == (50, 40)
    assert kept["ok4"]["query"] == "红色 马克杯"
    rejected = io.read_rejected(out).to_pylist()
    by_source = {r["source"].rsplit(":", 1)[1]: r for r in rejected}
    assert by_source["6"]["reason"] == V.MISSING_IMAGE and by_source["6"]["pair_id"] == "bad_missing"
    assert by_source["7"]["image"].startswith(b"\xff\xd8")  # the undecodable bytes are kept to inspect
    assert by_source["12"]["reason"] == V.DUPLICATE_PAIR_ID
    assert by_source["14"]["reason"] == V.INVALID_UTF8 and "\\xff" in by_source["14"]["raw"]
    assert all(r["detail"] for r in rejected)


def test_sources_on_s3(s3_endpoint, ray_module, tmp_path):
    """VOC folders, a manifest with relative image paths and Product1M images, all on s3."""
    from date_core.text import train_wordpiece

    base = f"s3://date-test/src-{uuid.uuid4().hex[:6]}"
    # Splits without train rows have no queries to learn from: ship a pretrained tokenizer.
    tok = str(tmp_path / "tok")
    train_wordpiece(["tea", "茶叶"], vocab_size=50).save_pretrained(tok)
    xml = ("<annotation><filename>T1.jpg</filename><size><width>64</width><height>48</height></size>"
           "<object><name>tea</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>40</xmax><ymax>30</ymax>"
           "</bndbox></object></annotation>")
    storage.write_bytes(f"{base}/voc/annotations/tea/T1.xml", xml.encode())
    storage.write_bytes(f"{base}/voc/annotations/tea/T2.xml", xml.replace("T1", "T2").encode())  # no image
    storage.write_bytes(f"{base}/voc/images/tea/T1.jpg", jpeg(64, 48, 4))
    assert prepare.main(["voc", f"{base}/voc", "--domain", "live", "--out", f"{base}/out-voc",
                         "--splits", "test=1.0", "--tokenizer", tok]) == 0
    s = read_summary(f"{base}/out-voc")
    assert (s["kept"], s["rejected_by_reason"]) == (1, {V.MISSING_IMAGE: 1})
    assert io.read_table(f"{base}/out-voc", "live", "test").column("box").to_pylist() == [[1, 2, 40, 30]]

    storage.write_bytes(f"{base}/man/img/a.jpg", jpeg(40, 40, 5))
    lines = [{"image": "img/a.jpg", "query": "tea", "box": None, "domain": "mall", "item_id": "t"},
             {"image": "img/b.jpg", "query": "tea", "box": None, "domain": "mall", "item_id": "t"}]
    storage.write_bytes(f"{base}/man/m.jsonl", "\n".join(json.dumps(x) for x in lines).encode())
    assert prepare.main(["manifest", f"{base}/man/m.jsonl", "--out", f"{base}/out-man", "--splits", "val=1.0",
                         "--tokenizer", tok]) == 0
    s = read_summary(f"{base}/out-man")
    assert (s["kept"], s["rejected_by_reason"]) == (1, {V.MISSING_IMAGE: 1})

    storage.write_bytes(f"{base}/p1m/imgs/x/9.jpg", jpeg(30, 30, 6))
    storage.write_bytes(f"{base}/p1m/p.txt", "9#####茶叶#####https://h/x/9.jpg#####https://m/9.jpg\n".encode())
    assert prepare.main(["product1m", f"{base}/p1m/p.txt", "--images", f"{base}/p1m/imgs",
                         "--out", f"{base}/out-p1m", "--splits", "test=1.0",
                         "--tokenizer", tok]) == 0
    assert io.read_table(f"{base}/out-p1m", "mall", "test").column("query").to_pylist() == ["茶叶"]


def test_product1m_missing_images_are_rejected_rows(ray_module, tmp_path):
    (tmp_path / "imgs" / "i1").mkdir(parents=True)
    (tmp_path / "imgs" / "i1" / "a1.jpg").write_bytes(jpeg(80, 80, 1))
    (tmp_path / "imgs" / "i1" / "42.jpg").write_bytes(jpeg(60, 80, 2))
    text = ("41#####雅诗兰黛 小棕瓶#####https://x/i1/a1.jpg#####https://y/a1.jpg#####雅诗兰黛小棕瓶\n"
            "42#####兰蔻 粉水#####https://x/i1/zz.jpg#####https://y/zz.jpg#####兰蔻粉水\n"
            "43#####某商品#####https://x/i1/gone.jpg#####https://y/gone.jpg#####其他\n")
    (tmp_path / "p1m.txt").write_text(text, encoding="utf-8")
    out = str(tmp_path / "out")
    assert prepare.main(["product1m", str(tmp_path / "p1m.txt"), "--images", str(tmp_path / "imgs"),
                         "--out", out, "--splits", "train=1.0", "--vocab-size", "200"]) == 0
    summary = read_summary(out)
    assert (summary["kept"], summary["rejected_by_reason"]) == (2, {V.MISSING_IMAGE: 1})
    table = io.read_table(out, "mall", "train").sort_by("pair_id")
    assert table.column("item_id").to_pylist() == ["雅诗兰黛小棕瓶", "兰蔻粉水"]
    assert table.column("box").to_pylist() == [None, None]
    # The instance labels of kept rows reach the written Parquet (they used to be dropped).
    assert table.column("instance_ids").to_pylist() == [["雅诗兰黛小棕瓶"], ["兰蔻粉水"]]
    from date_core.text import load_tokenizer

    assert load_tokenizer(Path(out) / "tokenizer").tokenize("兰蔻粉水") == ["兰", "蔻", "粉", "水"]


def test_product1m_real_query_files_lose_no_line(product1m_annotations, ray_module, tmp_path):
    """``prepare product1m`` on Product1M's real dev and test files, whose images are not here:
    every line is read and rejected as ``missing_image`` with its instance labels, none lost
    (tests/test_data_sources.py checks the parsed labels line by line)."""
    (tmp_path / "imgs").mkdir()
    for name, path in product1m_annotations.items():
        n_lines = sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
        out = str(tmp_path / name)
        assert prepare.main(["product1m", str(path), "--images", str(tmp_path / "imgs"), "--out", out]) == 0
        s = read_summary(out)
        assert (s["read"], s["kept"], s["rejected"]) == (n_lines, 0, n_lines), name
        assert s["rejected_by_reason"] == {V.MISSING_IMAGE: n_lines} and io.list_datasets(out) == []
        rejected = io.read_rejected(out)
        assert rejected.num_rows == n_lines and set(rejected.column("reason").to_pylist()) == {V.MISSING_IMAGE}
        assert rejected.column("instance_ids").null_count == 0
        print(f"[prepare product1m {name}] read {s['read']}, kept {s['kept']}, rejected {s['rejected']} "
              f"{s['rejected_by_reason']}")


def test_voc_groceries_full_ingest(groceries_dir, ray_module, tmp_path):
    out = str(tmp_path / "groceries")
    # 87 MB of JPEGs in ~20 MB shards: the train split must come out in several files.
    assert prepare.main(["voc", str(groceries_dir), "--domain", "mall", "--out", out, "--shard-mb", "20"]) == 0
    summary = read_summary(out)
    assert (summary["read"], summary["kept"], summary["rejected"]) == (4947, 4947, 0)
    train_files = summary["per_domain_split"]["mall"]["train"]["files"]
    assert len(train_files) >= 3 and len(io.parquet_files(f"{out}/mall/train")) == len(train_files)
    tables = read_all(out)
    assert sum(t.num_rows for t in tables.values()) == 4947
    # Every one of the 11,663 hand-drawn boxes is in the data: the largest as `box`, the rest as alternatives.
    n_boxes = sum(1 + len(a or []) for t in tables.values() for a in t.column("alt_boxes").to_pylist())
    assert n_boxes == 11663 and summary["notes"] == {}
    assert len({r for t in tables.values() for r in t.column("item_id").to_pylist()}) == 25
    assert {s for _, s in tables} == {"train", "val", "test"}
