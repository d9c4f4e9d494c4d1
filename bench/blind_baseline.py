"""Query-blind baselines on ProductWorld, and the generator's single-process throughput.

ProductWorld is a grounding benchmark only if the query must be read: a baseline that ignores
it (the largest product, a centred box of the median target size, a random product) must stay
at or below Acc@0.5 0.65 on ``mall`` and 0.35 on ``live``. The sample (~2000 pairs per domain)
comes straight from the generator, so every product's box is known.

A crude reader that only matches the query's colour word against each product's dominant
colour (same oracle boxes) is reported beside them: reading must beat not reading.

Throughput is measured on the same sample (one process, wall and CPU time), beside a plain
reference: JPEG-encoding a blank frame of the same size, the floor of any generator.

    python bench/blind_baseline.py [--pairs 2000] [--seed 0]

Writes ``bench/results/blind_baseline.json`` and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path


import yaml
from PIL import Image

from _common import markdown_table, write_result
from date_core.data.productworld import ProductWorldConfig, render_scenes
from date_core.data.productworld.blind import (BLIND_LIMITS, blind_baselines, colour_reader,
                                               scene_stats)

#: Pairs in the paper's data, to project generation time.
PAPER_PAIRS = {"mall": 474_000, "live": 101_000}


def _sample(domain: str, n_pairs: int, seed: int, cfg: ProductWorldConfig):
    scenes, pairs, start = [], 0, 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while pairs < n_pairs:
        chunk = render_scenes(domain, range(start, start + 100), seed, cfg)
        scenes.extend(chunk)
        pairs += sum(len(s.rows) for s in chunk)
        start += 100
    return scenes, time.perf_counter() - wall0, time.process_time() - cpu0


def _jpeg_floor(width: int, height: int, n: int = 300) -> float:
    """Images/s of encoding a blank frame (CPU time): what any generator costs at least."""
    img = Image.new("RGB", (width, height), (200, 200, 200))
    cpu0 = time.process_time()
    for _ in range(n):
        img.save(io.BytesIO(), format="JPEG", quality=85)
    return n / max(1e-9, time.process_time() - cpu0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2000, help="pairs per domain (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pw-config", default=None,
                    help="YAML file of generator knobs over the defaults (e.g. bench/configs/productworld_calibrated.yaml)")
    ap.add_argument("--domains", default="mall,live", help="comma-separated domains to sample")
    ap.add_argument("--name", default="blind_baseline", help="result file bench/results/<name>.json")
    args = ap.parse_args(argv)
    knobs = yaml.safe_load(Path(args.pw_config).read_text(encoding="utf-8")) if args.pw_config else {}
    cfg = ProductWorldConfig.from_dict(knobs)

    baseline_rows, reader_rows, speed_rows, stats_rows = [], [], [], []
    result: dict = {"domains": {}}
    for domain in args.domains.split(","):
        scenes, wall, cpu = _sample(domain, args.pairs, args.seed, cfg)
        base = blind_baselines(scenes)
        reader = colour_reader(scenes)
        stats = scene_stats(scenes)
        n_img, n_pairs = len(scenes), stats["pairs"]
        style = cfg.style(domain)
        floor = _jpeg_floor(style.width, style.height)
        speed = {
            "images_per_s_wall": n_img / wall, "images_per_s_cpu": n_img / cpu,
            "pairs_per_s_cpu": n_pairs / cpu, "jpeg_only_images_per_s_cpu": floor,
            "cost_vs_jpeg_only": floor / (n_img / cpu),
            "kb_per_image": sum(len(s.rows[0]["image"]) for s in scenes) / n_img / 1024,
            "paper_scale_cpu_hours": PAPER_PAIRS[domain] / (n_pairs / cpu) / 3600,
        }
        limit = BLIND_LIMITS[domain]
        result["domains"][domain] = {"baselines": base, "colour_reader": reader,
                                     "limit_acc@0.5": limit, "stats": stats,
                                     "speed": speed, "style": cfg.to_dict()[domain]}
        for name, score in base.items():
            baseline_rows.append({"domain": domain, "baseline": name, "pairs": score["pairs"],
                                  "acc@0.5": score["acc@0.5"], "mIoU": score["mIoU"],
                                  "limit": limit, "ok": score["acc@0.5"] <= limit})
        reader_rows.append({"domain": domain, "reference": "colour_reader (oracle boxes)",
                            "pairs": reader["pairs"], "acc@0.5": reader["acc@0.5"], "mIoU": reader["mIoU"],
                            "gain_over_largest": reader["acc@0.5"] - base["largest"]["acc@0.5"]})
        speed_rows.append({"domain": domain, "size": f"{style.width}x{style.height}", "images": n_img,
                           **{k: round(v, 2) for k, v in speed.items()}})
        stats_rows.append({"domain": domain, **{k: round(v, 3) if isinstance(v, float) else v
                                                for k, v in stats.items()}})
    result["all_within_limits"] = all(r["ok"] for r in baseline_rows)
    result["seed"] = args.seed
    result["pw_config"] = knobs
    path = write_result(args.name, result)

    print(f"### Query-blind grounding baselines (ProductWorld, {args.pw_config or 'default config'})\n")
    print(markdown_table(baseline_rows))
    print("\n### Reading the query helps (crude colour-word reader, same oracle boxes)\n")
    print(markdown_table(reader_rows))
    print("\n### Sample statistics\n")
    print(markdown_table(stats_rows))
    print("\n### Generator throughput (single process)\n")
    print(markdown_table(speed_rows))
    print(f"\nwritten {path}")
    return result


if __name__ == "__main__":
    main()
