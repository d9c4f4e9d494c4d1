"""Source parsers (manifest, VOC, Product1M) and assembly (duplicates, splits), without Ray."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from date_core.data import validate as V
from date_core.data.assemble import assemble, estimate_row_bytes, rows_per_file
from date_core.data.manifest import iter_manifest
from date_core.data.product1m import iter_product1m, parse_line
from date_core.data.schema import DataError
from date_core.data.voc import class_phrase, iter_voc


def save_jpeg(path: Path, w: int = 64, h: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path, format="JPEG")
    return path


def _reasons(items) -> dict[str, str]:
    return {i.get("source"): i["reason"] for i in items if i.get("reason")}


def test_manifest_lines_become_records_or_reasoned_rejections(tmp_path):
    save_jpeg(tmp_path / "img" / "a.jpg")
    good = {"image": "img/a.jpg", "query": "a mug", "box": [1, 2, 30, 40], "domain": "mall", "item_id": "m"}
    lines = [
        json.dumps(good).encode(),                                                      # 1 ok
        json.dumps({**good, "box": None, "split": "val", "pair_id": "x"}).encode(),     # 2 ok
        b'{"image": "img/a.jpg", "query": "caf\xe9"}',                                   # 3 not UTF-8
        b"{not json",                                                                    # 4
        json.dumps([1, 2]).encode(),                                                     # 5 not an object
        json.dumps({**good, "query": 7}).encode(),                                       # 6 wrong type
        json.dumps({**good, "box": "1,2,3,4"}).encode(),                                 # 7 wrong type
        json.dumps({k: v for k, v in good.items() if k != "item_id"}).encode(),          # 8 missing
        json.dumps({**good, "split": "dev"}).encode(),                                   # 9 bad split
        b"   ",                                                                          # blank: no row
        json.dumps({**good, "width": "64"}).encode(),                                    # 11 wrong type
    ]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    items = list(iter_manifest(str(path)))
    assert len(items) == 10
    assert _reasons(items) == {
        f"{path}:3": V.INVALID_UTF8, f"{path}:4": V.INVALID_JSON, f"{path}:5": V.INVALID_JSON,
        f"{path}:6": V.BAD_TYPE, f"{path}:7": V.BAD_TYPE, f"{path}:8": V.MISSING_FIELD,
        f"{path}:9": V.BAD_SPLIT, f"{path}:11": V.BAD_TYPE,
    }
    ok = [i for i in items if not i.get("reason")]
    assert [i["pair_id"] for i in ok] == ["m.jsonl:1", "x"]
    assert ok[0]["image_ref"] == str(tmp_path / "img" / "a.jpg") and ok[0]["image_id"] == "img/a.jpg"
    bad_utf8 = next(i for i in items if i.get("reason") == V.INVALID_UTF8)
    assert "caf\\xe9" in bad_utf8["raw"]  # the original bytes survive, escaped
    typed = next(i for i in items if i["source"].endswith(":6"))
    assert typed["item_id"] == "m" and '"query": 7' in typed["raw"]


def test_manifest_structural_errors(tmp_path):
    path = tmp_path / "no_query.jsonl"
    path.write_text("\n".join(json.dumps({"image": "a.jpg", "domain": "mall", "item_id": "i"}) for _ in range(3)))
    with pytest.raises(DataError, match=r"no_query.jsonl: no row has the required field\(s\) query"):
        list(iter_manifest(str(path)))
    table = pa.table({"image": ["a.jpg"], "query": ["q"], "item_id": ["i"]})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m.parquet: missing column\(s\) domain"):
        list(iter_manifest(str(tmp_path / "m.parquet")))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match="junk.parquet: unreadable Parquet"):
        list(iter_manifest(str(tmp_path / "junk.parquet")))
    with pytest.raises(DataError, match="nothing.jsonl: file not found"):
        list(iter_manifest(str(tmp_path / "nothing.jsonl")))


def test_parquet_manifest_rows(tmp_path):
    save_jpeg(tmp_path / "a.jpg")
    table = pa.table({"image": ["a.jpg", "a.jpg"], "query": ["q1", "q2"], "domain": ["live", "live"],
                      "item_id": ["i", "i"], "box": [[1.0, 1.0, 9.0, 9.0], None]})
    pq.write_table(table, tmp_path / "m.parquet")
    items = list(iter_manifest(str(tmp_path / "m.parquet")))
    assert [i.get("reason") for i in items] == [None, None]
    assert items[0]["box"] == [1, 1, 9, 9] and items[1]["box"] is None


def test_assemble_duplicates_and_split_conflicts():
    def r(pid, image, split=None):
        return {"pair_id": pid, "image_id": image, "image_ref": f"/x/{image}", "query": "q", "domain": "mall",
                "item_id": "i", "split": split, "source": pid}
    items = [r("a", "img1"), r("b", "img1", "test"), r("a", "img2"), r("c", "img1", "val"), r("d", "img1"),
             {"source": "bad", "reason": V.INVALID_JSON}]
    asm = assemble(items)
    assert asm.read == 6
    assert asm.records.column("pair_id").to_pylist() == ["a", "b", "d"]
    # The named split binds every row of the image, including the one read before it.
    assert set(asm.records.column("split").to_pylist()) == {"test"}
    assert dict(zip(asm.rejected.column("source").to_pylist(), asm.rejected.column("reason").to_pylist())) == {
        "a": V.DUPLICATE_PAIR_ID, "c": V.SPLIT_CONFLICT, "bad": V.INVALID_JSON}
    assert rows_per_file(50_000, 256) == 5120


def _voc_xml(filename: str, objects: list[tuple[str, tuple[int, int, int, int]]], size=(64, 48)) -> str:
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                   f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return (f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")


def test_voc_pairs_per_class_with_largest_box_first(tmp_path):
    ann, img = tmp_path / "annotations" / "coffee", tmp_path / "images" / "coffee"
    ann.mkdir(parents=True)
    save_jpeg(img / "C1.jpg")
    (ann / "C1.xml").write_text(_voc_xml("C1.jpg", [("coffee", (5, 5, 20, 20)), ("coffee", (1, 1, 40, 40)),
                                                    ("tomato_sauce", (30, 10, 60, 45))]))
    (ann / "C2.xml").write_text(_voc_xml("C2.jpg", [("coffee", (1, 1, 10, 10))]))   # image missing
    (ann / "C3.xml").write_text("<annotation><filename>")                          # broken XML
    (ann / "C4.xml").write_text(_voc_xml("C1.jpg", []))                            # no object
    items = list(iter_voc(str(tmp_path), "mall"))
    ok = [i for i in items if not i.get("reason")]
    assert [(i["pair_id"], i["query"], i["item_id"]) for i in ok] == [
        ("coffee/C1:coffee", "a pack of coffee", "coffee"),
        ("coffee/C1:tomato_sauce", "a jar of tomato sauce", "tomato_sauce")]
    # 1-based inclusive VOC -> 0-based continuous; the largest box leads, the others are alternatives.
    assert ok[0]["box"] == [0, 0, 40, 40] and ok[0]["alt_boxes"] == [[4, 4, 20, 20]]
    assert ok[0]["width"] == 64 and ok[0]["image_ref"] == str(img / "C1.jpg")
    assert sorted(i["reason"] for i in items if i.get("reason")) == [
        V.INVALID_ANNOTATION, V.MISSING_IMAGE, V.NO_OBJECTS]
    assert class_phrase("dish_soap") == "a pack of dish soap"
    assert class_phrase("tea", "a photo of {name}") == "a photo of tea"
    with pytest.raises(DataError, match="not a Pascal VOC dataset"):
        list(iter_voc(str(tmp_path / "images"), "mall"))


def test_product1m_lines(tmp_path):
    save_jpeg(tmp_path / "imgs" / "ab" / "O1CN01xyz.jpg")
    save_jpeg(tmp_path / "imgs" / "extra" / "777.jpg")
    lines = [
        "555#####雅诗兰黛 小棕瓶 精华#####https://img.example.com/i1/O1CN01xyz.jpg#####http://mirror/x.jpg"
        "#####雅诗兰黛小棕瓶#;#兰蔻粉水#;# 雅诗兰黛小棕瓶 #;#",
        "777#####兰蔻 粉水 400ml#####https://img.example.com/i2/gone.jpg#####https://m/gone2.jpg",  # by id
        "888#####某商品#####https://img.example.com/i3/nowhere.jpg",
        "999#####only two fields",
    ]
    path = tmp_path / "p1m.txt"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"1000#####\xff\xfe#####http://x/y.jpg\n")
    items = list(iter_product1m(str(path), str(tmp_path / "imgs"), "mall"))
    ok = [i for i in items if not i.get("reason")]
    assert [(i["pair_id"], i["item_id"], i["box"]) for i in ok] == [
        ("555", "兰蔻粉水#;#雅诗兰黛小棕瓶", None), ("777", "777", None)]
    assert ok[0]["query"] == "雅诗兰黛 小棕瓶 精华" and ok[0]["image_ref"].endswith("ab/O1CN01xyz.jpg")
    # instance labels: the line's order, repeats kept, stripped, empty ones dropped; none -> null
    assert [i["instance_ids"] for i in ok] == [["雅诗兰黛小棕瓶", "兰蔻粉水", "雅诗兰黛小棕瓶"], None]
    assert _reasons(items) == {f"{path}:3": V.MISSING_IMAGE, f"{path}:4": V.INVALID_LINE,
                               f"{path}:5": V.INVALID_UTF8}
    assert parse_line("1#####t#####//cdn/a.jpg")[2] == ["//cdn/a.jpg"]


def test_product1m_real_query_files_every_line_parsed_and_rejected_for_its_image(product1m_annotations, tmp_path):
    """Product1M's real dev and test files (9,220 lines) with no image on disk: every line is
    read, parses, and comes out as a rejected ``missing_image`` row carrying its labels."""
    (tmp_path / "imgs").mkdir()
    real_lines = {
        # (file, line) -> instance_ids, as published (a label listed twice: two in the set)
        ("dev", 1): ["AHC 黄金面霜", "AHC 黄金蜗牛原液精华液", "AHC 黄金水", "AHC 黄金眼霜", "AHC 黄金眼霜"],
        ("dev", 1000): ["德妃 紫苏舒缓保湿乳液", "德妃 紫苏爽肤水200ml"],
        ("dev", 2673): ["sk2 神仙水", "sk2 神仙水", "sk2 舒透护肤洁面霜", "sk2 大红瓶面霜", "sk2 大红瓶面霜"],
        ("test", 5000): ["兰蔻 菁纯眼霜", "兰蔻 菁纯眼霜"],  # "眼霜20ml*2套装"
    }
    for name, path in product1m_annotations.items():
        n_lines = sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
        asm = assemble(iter_product1m(str(path), str(tmp_path / "imgs"), "mall"))
        rows = asm.rejected.to_pylist()
        assert asm.read == n_lines == len(rows) and asm.records.num_rows == 0, name
        assert {r["reason"] for r in rows} == {V.MISSING_IMAGE} and all("none of" in r["detail"] for r in rows)
        assert sorted(int(r["source"].rsplit(":", 1)[1]) for r in rows) == list(range(1, n_lines + 1))
        assert all(r["instance_ids"] and r["query"] and r["pair_id"] for r in rows)
        by_line = {int(r["source"].rsplit(":", 1)[1]): r for r in rows}
        for (file, line), labels in real_lines.items():
            if file == name:
                assert by_line[line]["instance_ids"] == labels
                assert by_line[line]["item_id"] == "#;#".join(sorted(set(labels)))
        # labels per query as the folder's README counts them (repeats included): 2.77 dev, 2.86 test
        mean = sum(len(r["instance_ids"]) for r in rows) / len(rows)
        assert round(mean, 2) == {"dev": 2.77, "test": 2.86}[name]
        print(f"[product1m {name}] {asm.read} lines read, {asm.records.num_rows} kept, {len(rows)} rejected "
              f"(missing_image), {mean:.2f} labels per query")


def test_estimate_row_bytes_reads_file_sizes(tmp_path):
    p = save_jpeg(tmp_path / "a.jpg", 120, 90)
    asm = assemble([{"pair_id": "a", "image_id": "a", "image_ref": str(p), "query": "q", "domain": "d",
                     "item_id": "i", "source": "s"}])
    assert estimate_row_bytes(asm.records) == pytest.approx(p.stat().st_size + 200)
