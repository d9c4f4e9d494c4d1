"""Shared command-line plumbing of the pipeline stages (``pipelines/*.py``, installed as the
``date-*`` commands): ``--config``, ``--set``, the resolved config, one-line refusals, and the
offline environment every stage runs in (set on import, before torch or Ray load)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Iterator

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray Data's live progress bars turn the logs of non-interactive jobs into megabytes of noise;
# the stages print their own progress (step, ETA). Read by Ray Data at import time.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Likewise MLflow's artifact progress bars and its "View run at <url>" lines after every run
# update against a tracking server (the stages print their MLflow run ids themselves).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def config_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every stage shares; ``--help`` ends with every config key, its
    type and default (from the typed schema, :func:`date_core.config_schema.describe`)."""
    from date_core.config_schema import describe

    parser = argparse.ArgumentParser(description=description, epilog=describe(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML config merged over the packaged defaults (date_core/configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override one config value (YAML syntax, repeatable), e.g. --set train.epochs=2")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config (YAML) and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's INFO lines and core logs, and MLflow's database set-up")
    return parser


def resolve(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """Resolve the config and say in one line where it came from (``--dry-run`` prints all of
    it; each run logs it to MLflow as ``config.yaml``); exits with one clear line on a bad file
    or override (an unknown key or a wrongly typed value, anywhere: :mod:`date_core.config_schema`)."""
    import yaml

    from date_core.config import resolve_config
    from date_core.config_types import to_dict

    set_verbosity(bool(getattr(args, "verbose", False)))
    try:
        cfg = resolve_config(args.config, args.overrides)
    except (OSError, ValueError, KeyError) as exc:
        sys.exit(f"{stage}: bad configuration: {exc}")
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), flush=True)
    else:
        print(f"[{stage}] {config_summary(args.config, args.overrides)}", flush=True)
    return cfg


def set_verbosity(verbose: bool) -> None:
    """``--verbose``: ``DATE_VERBOSE=1`` for this process and the Ray processes it starts
    (:func:`date_core.runtime.session.local_ray_options` reads it); otherwise library loggers
    that narrate their routine (MLflow creating its database tables, checking a model's input
    example against its signature) stay at WARNING."""
    import logging

    if verbose:
        os.environ["DATE_VERBOSE"] = "1"
        return
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.pyfunc"):
        logging.getLogger(name).setLevel(logging.WARNING)


def config_summary(config_file: str | None, overrides: list[str]) -> str:
    """``config: the defaults + my.yaml + 2 overrides (adapt.rounds=3, train.seed=1)``."""
    parts = ["the defaults"] + ([config_file] if config_file else [])
    line = "config: " + " + ".join(parts)
    if overrides:
        shown = ", ".join(overrides)
        line += f" + {len(overrides)} override{'s' if len(overrides) > 1 else ''} ({shown})"
    return line + " (--dry-run prints it; MLflow keeps it as config.yaml)"


def check_dataset(cfg: dict[str, Any], stage: str) -> None:
    """Exit with one line when ``data.root`` lacks a dataset, domain or split that ``stage``
    reads and may not generate one there (checked before Ray starts; see
    :mod:`date_core.runtime.dataset`)."""
    from date_core.data.schema import DataError
    from date_core.runtime.dataset import plan_dataset, required_parts

    try:
        plan_dataset(cfg, required_parts(cfg, stage))
    except DataError as exc:
        sys.exit(f"{stage}: {exc}")


@contextlib.contextmanager
def stage_errors(stage: str, name: str) -> Iterator[None]:
    """Exit with one line (and a non-zero code) when a data stream stalled or its CPU budget
    could not be reserved, however deep in a Ray Train or Tune failure the cause sits; other
    errors pass through with their tracebacks."""
    from date_core.runtime.budget import BudgetError
    from date_core.runtime.watchdog import StallError, find_cause, one_line

    try:
        yield
    except Exception as exc:
        cause = find_cause(exc, (StallError, BudgetError))
        if cause is None:
            raise
        sys.exit(f"{stage}: {one_line(cause)} (run {name}; the same command with --set runtime.run_name={name} "
                 f"continues it)")
