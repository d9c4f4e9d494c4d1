"""Pure-pyarrow reading/writing of prepared datasets, storage resolution, tokenizer output."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from date_core.data import io, storage
from date_core.data.outputs import prepare_output, save_tokenizer
from date_core.data.schema import PAIR_SCHEMA, DataError
from date_core.text import load_tokenizer, train_wordpiece


def pairs(n: int, domain: str = "mall", split: str = "train") -> pa.Table:
    return pa.Table.from_pydict({
        "pair_id": [f"{domain}-{i}" for i in range(n)], "image_id": [f"im{i}" for i in range(n)],
        "image": [b"\xff\xd8" + bytes([i]) for i in range(n)], "width": [10] * n, "height": [8] * n,
        "query": [f"红色 mug {i}" for i in range(n)], "box": [[0, 0, 5, 5] if i % 2 else None for i in range(n)],
        "alt_boxes": [[[1, 1, 2, 2]] if i % 3 == 0 else None for i in range(n)],
        "domain": [domain] * n, "split": [split] * n, "item_id": [f"it{i % 3}" for i in range(n)],
    }, schema=PAIR_SCHEMA)


def test_write_read_roundtrip_and_sharding(tmp_path):
    table = pairs(25)
    files = io.write_table(table, str(tmp_path), "mall", "train", rows_per_file=10)
    assert len(files) == 3
    io.write_table(pairs(4, "live", "val"), str(tmp_path), "live", "val")
    back = io.read_table(str(tmp_path), "mall", "train").sort_by("pair_id")
    assert back.equals(table.sort_by("pair_id"))
    assert io.list_datasets(str(tmp_path)) == [("live", "val"), ("mall", "train")]
    q = io.read_table(str(tmp_path), "live", "val", columns=["query"])
    assert q.column_names == ["query"] and q.num_rows == 4


def test_read_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="mall/test: no Parquet files found"):
        io.read_table(str(tmp_path), "mall", "test")
    folder = tmp_path / "mall" / "train"
    folder.mkdir(parents=True)
    pq.write_table(pairs(3).drop_columns(["box"]), folder / "x.parquet")
    with pytest.raises(DataError, match=r"mall/train: missing column\(s\) 'box'"):
        io.read_table(str(tmp_path), "mall", "train")
    (folder / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable Parquet"):
        io.read_table(str(tmp_path), "mall", "train")


def test_numpy_batches_have_the_ray_layout():
    batch = next(io.iter_numpy_batches(pairs(5), 4))
    assert batch["width"].dtype == np.int32 and batch["width"].shape == (4,)
    assert batch["image"].dtype == object and isinstance(batch["image"][0], bytes)
    assert batch["box"].dtype == object and batch["box"].shape == (4,) and batch["box"][0] is None
    assert [len(b) for b in io.iter_numpy_batches(pairs(5), 4)][-1] > 0


def test_storage_resolves_local_and_s3_uris(tmp_path, monkeypatch):
    fs, path = storage.resolve_filesystem(str(tmp_path / "a" / ".." / "b"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "b")
    assert storage.join("s3://bkt/pre/", "mall", "train") == "s3://bkt/pre/mall/train"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    fs, path = storage.resolve_filesystem("s3://bkt/pre/x.parquet")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bkt/pre/x.parquet"
    assert fs.region == "eu-west-3"
    # The endpoint travels in the filesystem's pickle (what Ray workers receive), keys do not.
    state = repr(fs.__reduce__())
    assert "127.0.0.1:9" in state and "http" in state
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETLOOKING")
    assert "AKIDSECRETLOOKING" not in repr(storage.resolve_filesystem("s3://bkt/x")[0].__reduce__())
    with pytest.raises(ValueError):
        storage.resolve_filesystem("s3://")


def test_prepare_output_guards_an_existing_dataset(tmp_path):
    out = str(tmp_path / "ds")
    prepare_output(out)
    io.write_table(pairs(3), out, "mall", "train")
    (tmp_path / "ds" / "_summary.json").write_text("{}")
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="already holds a prepared dataset"):
        prepare_output(out)
    prepare_output(out, overwrite=True)
    assert io.list_datasets(out) == [] and not (tmp_path / "ds" / "_summary.json").exists()
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine"  # not ours: untouched


def test_tokenizer_trained_on_train_queries_tokenizes_chinese_per_character(tmp_path):
    out = str(tmp_path)
    table = pairs(6)
    table = table.set_column(table.schema.get_field_index("query"), "query",
                             pa.array(["红色连衣裙 夏季", "蓝色 牛仔裤", "a red mug", "红色 mug", "连衣裙", "blue jeans"]))
    io.write_table(table, out, "mall", "train")
    io.write_table(pairs(2, "mall", "val"), out, "mall", "val")  # val queries must not be seen
    info = save_tokenizer(out, domains=["mall"], vocab_size=300)
    assert info["train_queries"] == 6
    tok = load_tokenizer(tmp_path / "tokenizer")
    assert tok.tokenize("红色连衣裙") == ["红", "色", "连", "衣", "裙"]
    assert tok.tokenize("红色 MUG") == ["红", "色", "mug"]
    assert "[UNK]" not in tok.tokenize("夏季 连衣裙")
    # A pretrained tokenizer is copied as it is, not retrained.
    other = train_wordpiece(["zebra crossing"], vocab_size=100)
    other.save_pretrained(tmp_path / "pre")
    info = save_tokenizer(str(tmp_path / "out2"), pretrained=str(tmp_path / "pre"))
    assert info["source"] == "pretrained"
    assert load_tokenizer(tmp_path / "out2" / "tokenizer").get_vocab() == other.get_vocab()


def test_instance_ids_is_an_optional_column(tmp_path):
    labels = [["AHC 黄金水", "AHC 黄金眼霜", "AHC 黄金眼霜"], None, ["兰蔻粉水"]]
    table = pairs(3).append_column("instance_ids", pa.array(labels, pa.list_(pa.string())))
    io.write_table(table, str(tmp_path), "mall", "test")
    back = io.read_table(str(tmp_path), "mall", "test").sort_by("pair_id")
    assert back.column("instance_ids").to_pylist() == labels
    # a dataset without the column stays valid (test_write_read_roundtrip_and_sharding); one with
    # the column of the wrong kind is refused, naming it
    bad = pairs(2).append_column("instance_ids", pa.array([[1], [2]], pa.list_(pa.int64())))
    io.write_table(bad, str(tmp_path), "mall", "val")
    with pytest.raises(DataError, match="column 'instance_ids' has type"):
        io.read_table(str(tmp_path), "mall", "val")
