"""Run counts: read / kept / rejected by reason, per domain and split, written to ``_summary.json``.

A :class:`RunSummary` is additive: each Ray write task counts its own rows and the driver
merges the partial summaries, so the totals are exact however the data was sharded.
Invariant checked by :meth:`RunSummary.check`: read == kept + rejected, in total and per group.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from . import storage
from .schema import SUMMARY_FILE

UNKNOWN_DOMAIN = "unknown"   # a rejected row whose domain could not be read
UNASSIGNED_SPLIT = "unassigned"


@dataclass
class RunSummary:
    """Counts of one prepare run. Keys of the per-group counters are ``(domain, split)``."""

    kept: Counter = field(default_factory=Counter)
    rejected: dict[tuple[str, str], Counter] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)
    files: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add_kept(self, table: pa.Table) -> None:
        """Count kept rows of a contract table (columns ``domain``, ``split``)."""
        for (domain, split), n in _group_counts(table).items():
            self.kept[(domain, split)] += n

    def add_rejected(self, table: pa.Table) -> None:
        """Count rejected rows (columns ``domain``, ``split``, ``reason``)."""
        if table.num_rows == 0:
            return
        cols = table.select(["domain", "split", "reason"]).to_pydict()
        for domain, split, reason in zip(cols["domain"], cols["split"], cols["reason"]):
            key = (domain or UNKNOWN_DOMAIN, split or UNASSIGNED_SPLIT)
            self.rejected.setdefault(key, Counter())[reason] += 1

    def add_notes(self, notes: list[str | None]) -> None:
        """Count corrections made to kept rows (``;``-joined note strings, None = none)."""
        for text in notes:
            if text:
                self.notes.update(text.split(";"))

    def add_file(self, domain: str, split: str, path: str) -> None:
        self.files.setdefault((domain, split), []).append(path)

    def merge(self, other: "RunSummary") -> "RunSummary":
        self.kept.update(other.kept)
        for key, counts in other.rejected.items():
            self.rejected.setdefault(key, Counter()).update(counts)
        self.notes.update(other.notes)
        for key, paths in other.files.items():
            self.files.setdefault(key, []).extend(paths)
        return self

    @property
    def total_kept(self) -> int:
        return sum(self.kept.values())

    @property
    def total_rejected(self) -> int:
        return sum(sum(c.values()) for c in self.rejected.values())

    def rejected_by_reason(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self.rejected.values():
            total.update(counts)
        return dict(sorted(total.items()))

    def to_dict(self, **meta: Any) -> dict[str, Any]:
        """The ``_summary.json`` content; ``meta`` (command, seed, ...) is stored alongside."""
        groups: dict[str, dict[str, Any]] = {}
        for key in sorted(set(self.kept) | set(self.rejected)):
            domain, split = key
            rej = self.rejected.get(key, Counter())
            groups.setdefault(domain, {})[split] = {
                "read": self.kept.get(key, 0) + sum(rej.values()),
                "kept": self.kept.get(key, 0),
                "rejected": sum(rej.values()),
                "rejected_by_reason": dict(sorted(rej.items())),
                "files": sorted(self.files.get(key, [])),
            }
        return {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **meta,
            "read": self.total_kept + self.total_rejected,
            "kept": self.total_kept,
            "rejected": self.total_rejected,
            "rejected_by_reason": self.rejected_by_reason(),
            "notes": dict(sorted(self.notes.items())),
            "per_domain_split": groups,
        }

    def write(self, out: str, **meta: Any) -> dict[str, Any]:
        """Write ``OUT/_summary.json`` and return its content."""
        data = self.to_dict(**meta)
        storage.write_bytes(storage.join(out, SUMMARY_FILE),
                            json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8"))
        return data


def _group_counts(table: pa.Table) -> Counter:
    if table.num_rows == 0:
        return Counter()
    cols = table.select(["domain", "split"]).to_pydict()
    return Counter(zip(cols["domain"], cols["split"]))


def read_summary(root: str) -> dict[str, Any]:
    """The ``_summary.json`` of a prepared dataset (local or s3)."""
    return json.loads(storage.read_bytes(storage.join(root, SUMMARY_FILE)).decode("utf-8"))


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of a summary dict (:meth:`RunSummary.to_dict`), for a command's output."""
    lines = [f"{'domain/split':<22}{'read':>9}{'kept':>9}{'rejected':>10}  reasons"]
    for domain, splits in summary["per_domain_split"].items():
        for split, c in splits.items():
            reasons = ", ".join(f"{r}={n}" for r, n in c["rejected_by_reason"].items())
            lines.append(f"{domain + '/' + split:<22}{c['read']:>9}{c['kept']:>9}{c['rejected']:>10}  {reasons}")
    lines.append(f"{'total':<22}{summary['read']:>9}{summary['kept']:>9}{summary['rejected']:>10}")
    return "\n".join(lines)
