"""Ray Data glue for prepared datasets: read, write, ingest and synthesise, local or ``s3://``.

Every call gets its pyarrow filesystem from :func:`date_core.data.storage.resolve_filesystem`
(pyarrow ignores ``AWS_ENDPOINT_URL`` on its own, Ray Data would build one from the bare URI).

The prepare pipeline is one streaming pass::

    records (or ray.data.range over image indices -> ProductWorld)
      -> map_batches(load + decode + validate)        # staged rows: reason null = kept
      -> write_datasink(PairsDatasink)                # OUT/<domain>/<split>/, OUT/rejected/

so every row read ends up counted exactly once, kept or rejected, however Ray shards it.
"""
from __future__ import annotations

import math
import posixpath
import uuid
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Dataset
from ray.data.datasource import Datasink, WriteResult

from date_core.data import io, storage
from date_core.data.assemble import Assembled, assemble, estimate_row_bytes
from date_core.data.ingest import ingest_batch, records_table, split_staged
from date_core.data.outputs import prepare_output, save_tokenizer, write_parse_rejects
from date_core.data.schema import PAIR_COLUMNS, PAIR_SCHEMA, REJECTED_DIR, REJECTED_SCHEMA, DataError, check_pair_schema
from date_core.data.splits import DEFAULT_FRACTIONS, assign_split
from date_core.data.summary import RunSummary
from date_core.data.transforms import BatchTransform
from date_core.data.shard import BLOCK_ROWS
from date_core.runtime.reader import count_rows, read_pairs  # noqa: F401  (the Ray Data read API)

#: Default Parquet file size: the contract asks for ~100-500 MB files on big data.
DEFAULT_SHARD_MB = 256.0


def to_model_batches(ds: Dataset, tokenizer: Any, image_size: int, max_text_len: int, *, train: bool = False,
                     batch_size: int = BLOCK_ROWS, seed: int | None = None, num_cpus: float | None = None) -> Dataset:
    """``ds`` (contract rows) -> model batches (:mod:`date_core.batch` keys, numpy), as Ray tasks.

    ``tokenizer``: an object or a folder (local or ``s3://``; loaded once here, then shipped
    with the transform). ``num_cpus`` per task (default 1; a fraction inside a stream budget,
    :mod:`date_core.runtime.budget`). Tasks rather than an actor pool on purpose: actors hold
    their CPUs for the whole run, so the read tasks of a small budget could never start.
    """
    from date_core.text import load_tokenizer

    if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
        tokenizer = load_tokenizer(str(tokenizer))
    transform = BatchTransform(tokenizer, image_size, max_text_len, train, seed=seed)
    return ds.map_batches(transform, batch_format="numpy", batch_size=batch_size,
                          num_cpus=1.0 if num_cpus is None else float(num_cpus))


def _to_contract(batch: pa.Table, domain: str, split: str) -> pa.Table:
    for name, value in (("domain", domain), ("split", split)):
        if name not in batch.column_names:
            batch = batch.append_column(name, pa.array([value] * batch.num_rows, pa.string()))
        elif batch.num_rows and pc.any(pc.not_equal(batch.column(name), value)).as_py():
            raise ValueError(f"write_pairs to {domain}/{split} got rows of another {name}")
    extra = [c for c in batch.column_names if c not in PAIR_COLUMNS]
    schema = pa.schema(list(PAIR_SCHEMA) + [batch.schema.field(c) for c in extra])
    return batch.select(list(PAIR_COLUMNS) + extra).cast(schema)


def write_pairs(ds: Dataset, out: str, domain: str, split: str, *, shard_mb: float = DEFAULT_SHARD_MB) -> None:
    """Write contract rows to ``OUT/<domain>/<split>/`` in files of about ``shard_mb`` MB.

    ``domain`` / ``split`` columns are added when absent and checked when present.
    """
    uri = io.pairs_uri(out, domain, split)
    fs, path = storage.resolve_filesystem(uri)
    ds.map_batches(_to_contract, fn_kwargs={"domain": domain, "split": split}, batch_format="pyarrow") \
      .write_parquet(path, filesystem=fs, min_bytes_per_file=int(shard_mb * 1e6),
                     row_group_size=io.ROW_GROUP_ROWS)


class PairsDatasink(Datasink[RunSummary]):
    """Writes staged rows (see :func:`date_core.data.ingest.ingest_batch`): kept rows to
    ``OUT/<domain>/<split>/part-*.parquet`` (the contract columns, then ``instance_ids``: null
    where the source has none), rejected rows to ``OUT/rejected/``.

    Ray hands each write task about ``shard_mb`` MB of rows (``min_bytes_per_write``), so each
    task writes one file per (domain, split) it sees: small data gives one file per split.
    Each task returns its counts; :attr:`summary` holds their sum after the write.
    """

    def __init__(self, out: str, shard_mb: float = DEFAULT_SHARD_MB):
        self.out, self.shard_mb = str(out), float(shard_mb)
        self.summary = RunSummary()

    @property
    def min_bytes_per_write(self) -> int:
        return int(self.shard_mb * 1e6)

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> RunSummary:
        fs, base = storage.resolve_filesystem(self.out)
        tag = f"part-{getattr(ctx, 'task_idx', 0):05d}-{uuid.uuid4().hex[:8]}.parquet"
        writers: dict[tuple[str, str], pq.ParquetWriter] = {}
        summary = RunSummary()

        def writer(key: tuple[str, str], schema: pa.Schema) -> pq.ParquetWriter:
            if key not in writers:
                folder = posixpath.join(base, *key)
                if not storage.is_s3(self.out):
                    fs.create_dir(folder, recursive=True)
                path = posixpath.join(folder, tag)
                writers[key] = pq.ParquetWriter(path, schema, filesystem=fs, compression="snappy",
                                                use_dictionary=io.DICTIONARY_COLUMNS)
                if key != (REJECTED_DIR,):
                    summary.add_file(key[0], key[1], f"{'/'.join(key)}/{tag}")
            return writers[key]

        try:
            for block in blocks:
                staged = pa.Table.from_batches(block.to_batches()) if not isinstance(block, pa.Table) else block
                # with_optional: kept rows keep ``instance_ids`` (null where the source has none),
                # so the files are written with the kept table's schema, not PAIR_SCHEMA.
                kept, rejected = split_staged(staged, with_optional=True)
                summary.add_kept(kept)
                summary.add_rejected(rejected)
                summary.add_notes(staged.filter(pc.is_null(staged.column("reason"))).column("notes").to_pylist())
                if kept.num_rows:
                    for (domain, split) in sorted(set(zip(*kept.select(["domain", "split"]).to_pydict().values()))):
                        mask = pc.and_(pc.equal(kept.column("domain"), domain), pc.equal(kept.column("split"), split))
                        writer((domain, split), kept.schema).write_table(kept.filter(mask), row_group_size=io.ROW_GROUP_ROWS)
                if rejected.num_rows:
                    writer((REJECTED_DIR,), REJECTED_SCHEMA).write_table(rejected, row_group_size=io.ROW_GROUP_ROWS)
        finally:
            for w in writers.values():
                w.close()
        return summary

    def on_write_complete(self, write_result: WriteResult[RunSummary]) -> None:
        for part in write_result.write_returns:
            self.summary.merge(part)


def _ingest(batch: pa.Table, io_threads: int) -> pa.Table:
    return ingest_batch(batch, io_threads=io_threads)


def run_ingest(records: pa.Table, out: str, *, shard_mb: float = DEFAULT_SHARD_MB, block_rows: int = 64,
               io_threads: int = 8) -> RunSummary:
    """Load, validate and write records (:data:`~date_core.data.ingest.RECORD_SCHEMA`) with Ray Data.

    Records are cut into blocks of ``block_rows`` so that image loading spreads over all
    workers (a block of records is tiny; its images are not).
    """
    if records.num_rows == 0:
        return RunSummary()
    blocks = [records.slice(i, block_rows) for i in range(0, records.num_rows, block_rows)]
    ds = ray.data.from_arrow(blocks)
    staged = ds.map_batches(_ingest, fn_kwargs={"io_threads": io_threads}, batch_format="pyarrow",
                            batch_size=None)
    sink = PairsDatasink(out, shard_mb)
    staged.write_datasink(sink)
    return sink.summary


def synth_batch(batch: Mapping[str, np.ndarray], counts: Sequence[tuple[str, int]], seed: int,
                fractions: Mapping[str, float], config: Any = None) -> pa.Table:
    """Render the images whose global indices are ``batch["id"]`` -> staged rows.

    Global index ``g`` is image ``g - offset`` of the domain whose range holds it (domains in
    the order of ``counts``), so the output is the same whatever the blocks are.
    """
    from date_core.data.productworld import render_images

    ids = np.asarray(batch["id"], dtype=np.int64)
    rows: list[dict] = []
    offset = 0
    for domain, n in counts:
        local = ids[(ids >= offset) & (ids < offset + n)] - offset
        if len(local):
            for row in render_images(domain, [int(i) for i in local], seed, config):
                row["split"] = assign_split(row["image_id"], fractions)
                row["source"] = f"productworld:seed={seed}"
                rows.append(row)
        offset += n
    return ingest_batch(records_table(rows), io_threads=4)


def run_synth(out: str, counts: Sequence[tuple[str, int]], seed: int, *,
              fractions: Mapping[str, float] = DEFAULT_FRACTIONS, config: Any = None,
              images_per_block: int = 32, shard_mb: float = DEFAULT_SHARD_MB) -> RunSummary:
    """Generate ProductWorld in parallel (``ray.data.range`` over image indices ->
    ``map_batches`` rendering + validation -> :class:`PairsDatasink`); deterministic per seed."""
    total = sum(n for _, n in counts)
    if total == 0:
        return RunSummary()
    ds = ray.data.range(total, override_num_blocks=max(1, math.ceil(total / images_per_block)))
    staged = ds.map_batches(
        synth_batch, batch_size=images_per_block, batch_format="numpy",
        fn_kwargs={"counts": list(counts), "seed": int(seed), "fractions": dict(fractions), "config": config},
    )
    sink = PairsDatasink(out, shard_mb)
    staged.write_datasink(sink)
    return sink.summary


def render_batch(batch: Mapping[str, np.ndarray], render: Any, kwargs: Mapping[str, Any]) -> pa.Table:
    """Rows ``batch["id"]`` of a planned dataset -> staged rows: ``render(indices, **kwargs)``
    returns one record (with its ``split``) per index; they are validated like any source."""
    rows = render([int(i) for i in np.asarray(batch["id"], dtype=np.int64)], **kwargs)
    return ingest_batch(records_table(rows), io_threads=4)


def run_render(out: str, total: int, render: Any, kwargs: Mapping[str, Any], *, images_per_block: int = 32,
               shard_mb: float = DEFAULT_SHARD_MB) -> RunSummary:
    """Generate the ``total`` rows of a planned dataset in parallel, as :func:`run_synth` does
    (``ray.data.range`` -> ``map_batches(render + validation)`` -> :class:`PairsDatasink`).

    ``render``: a module-level function ``(indices, **kwargs) -> records``, a pure function of
    its arguments (the instance modes: ProductWorld's and the VOC compositor's)."""
    if total == 0:
        return RunSummary()
    ds = ray.data.range(total, override_num_blocks=max(1, math.ceil(total / images_per_block)))
    staged = ds.map_batches(render_batch, batch_size=images_per_block, batch_format="numpy",
                            fn_kwargs={"render": render, "kwargs": dict(kwargs)})
    sink = PairsDatasink(out, shard_mb)
    staged.write_datasink(sink)
    return sink.summary


def prepare_rendered(out: str, total: int, render: Any, kwargs: Mapping[str, Any], *,
                     tokenizer: str | None = None, vocab_size: int = 8000, shard_mb: float = DEFAULT_SHARD_MB,
                     images_per_block: int = 32, overwrite: bool = False, meta: Mapping[str, Any] | None = None,
                     num_cpus: int | None = None) -> dict[str, Any]:
    """A whole prepare run of a planned dataset (:func:`run_render`): every row accounted for,
    every written dataset's schema checked against the contract, tokenizer, ``_summary.json``."""
    prepare_output(out, overwrite)
    ensure_ray(num_cpus)
    summary = run_render(out, total, render, kwargs, images_per_block=images_per_block, shard_mb=shard_mb)
    _check_accounting(summary, total, out)
    for domain, split in sorted(summary.kept):
        uri = io.pairs_uri(out, domain, split)
        fs, _ = storage.resolve_filesystem(uri)
        for path in io.parquet_files(uri):
            check_pair_schema(pq.read_schema(path, filesystem=fs), path)
    return _finish(out, summary, tokenizer=tokenizer, vocab_size=vocab_size, meta=meta or {})


def prepare_productworld_instance(out: str, queries: int, seed: int, *, items: int | None = None,
                                  distractors: int | None = None, single_per_item: int = 1,
                                  fractions: Mapping[str, float] = DEFAULT_FRACTIONS, config: Any = None,
                                  meta: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """A whole ``prepare synth --instance`` run: ProductWorld's instance mode
    (:mod:`date_core.data.productworld.instance`) -> ``OUT/multi/{train,val,test}``,
    ``OUT/single/{gallery,train}``. ``kwargs``: those of :func:`prepare_rendered`."""
    from date_core.data.productworld.instance import instance_styles, plan_instances, render_instance_rows

    instance_styles(config)  # a bad multi / single style fails before anything is written
    plan = plan_instances(queries, seed, items=items, distractors=distractors,
                          single_per_item=single_per_item, fractions=fractions)
    meta = {**(meta or {}), "mode": "productworld-instance", "seed": seed, "queries": queries,
            "instance": plan.counts(), "split_fractions": dict(fractions)}
    return prepare_rendered(out, plan.total, render_instance_rows, {"plan": plan, "config": config},
                            meta=meta, **kwargs)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start Ray if this process has not: the cluster at ``RAY_ADDRESS`` when set (``ray job
    submit`` sets it; ``RAY_ADDRESS=auto`` joins a ``ray start`` cluster on this machine), else
    a fresh local one with ``num_cpus`` (None: all cores). ``address="local"`` on purpose: a
    bare ``ray.init()`` would silently join whatever cluster last ran ``ray start`` here."""
    import os

    from date_core.runtime.session import local_ray_options

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 **local_ray_options(num_cpus or os.cpu_count() or 2))


def _finish(out: str, summary: RunSummary, *, tokenizer: str | None, vocab_size: int,
            meta: Mapping[str, Any]) -> dict[str, Any]:
    _verify_written(out, summary)
    domains = sorted({d for d, _ in summary.kept})
    tok_info = save_tokenizer(out, pretrained=tokenizer, domains=domains, vocab_size=vocab_size) \
        if summary.total_kept else None
    return summary.write(out, **meta, tokenizer=tok_info)


def prepare_records(items: Iterable[Mapping[str, Any]] | Assembled, out: str, *,
                    fractions: Mapping[str, float] = DEFAULT_FRACTIONS, tokenizer: str | None = None,
                    vocab_size: int = 8000, shard_mb: float = DEFAULT_SHARD_MB, overwrite: bool = False,
                    meta: Mapping[str, Any] | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """A whole prepare run over parser output (manifest / VOC / Product1M records and
    rejections, or their :class:`Assembled` form): assemble (duplicates, splits) -> Ray ingest
    -> tokenizer -> ``_summary.json``. Returns the summary dict.

    Passing an :class:`Assembled` lets a caller find structural errors (raised while parsing)
    before Ray starts; it must then have called :func:`prepare_output` itself.
    """
    if isinstance(items, Assembled):
        asm = items
    else:
        prepare_output(out, overwrite)
        asm = assemble(items, fractions)
    summary = RunSummary()
    write_parse_rejects(out, asm.rejected, summary)
    ensure_ray(num_cpus)
    block_rows = max(8, min(256, int(16e6 / estimate_row_bytes(asm.records))))
    summary.merge(run_ingest(asm.records, out, shard_mb=shard_mb, block_rows=block_rows))
    _check_accounting(summary, asm.read, out)
    return _finish(out, summary, tokenizer=tokenizer, vocab_size=vocab_size,
                   meta={**(meta or {}), "split_fractions": dict(fractions)})


def prepare_synth(out: str, mall: int, live: int, seed: int, *, fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
                  config: Any = None, tokenizer: str | None = None, vocab_size: int = 8000,
                  shard_mb: float = DEFAULT_SHARD_MB, images_per_block: int = 32, overwrite: bool = False,
                  meta: Mapping[str, Any] | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """A whole ``prepare synth`` run: ProductWorld ``mall`` + ``live`` images -> dataset at ``out``."""
    prepare_output(out, overwrite)
    ensure_ray(num_cpus)
    summary = run_synth(out, [("mall", mall), ("live", live)], seed, fractions=fractions, config=config,
                        images_per_block=images_per_block, shard_mb=shard_mb)
    return _finish(out, summary, tokenizer=tokenizer, vocab_size=vocab_size,
                   meta={**(meta or {}), "images": {"mall": mall, "live": live}, "seed": seed,
                         "split_fractions": dict(fractions)})


def _check_accounting(summary: RunSummary, read: int, out: str) -> None:
    # The promise of the pipeline: every row read is kept or rejected, exactly once.
    if summary.total_kept + summary.total_rejected != read:
        raise DataError(out, f"row accounting mismatch: read {read}, kept {summary.total_kept}, "
                             f"rejected {summary.total_rejected}")


def _verify_written(out: str, summary: RunSummary) -> None:
    # Read back the ids that were written (one small column): the files must hold exactly the
    # rows the summary counts, and no pair_id twice (the generator's ids are unique by
    # construction; parsed sources are deduplicated before ingest).
    seen: set[str] = set()
    for (domain, split), kept in sorted(summary.kept.items()):
        ids = io.read_table(out, domain, split, columns=["pair_id"]).column("pair_id").to_pylist()
        if len(ids) != kept:
            raise DataError(io.pairs_uri(out, domain, split), f"holds {len(ids)} rows, the run kept {kept}")
        seen.update(ids)
    if len(seen) != summary.total_kept:
        raise DataError(out, f"{summary.total_kept - len(seen)} duplicate pair_id(s) among kept rows")
