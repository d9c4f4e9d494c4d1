"""Promotion through the MLflow registry (a real `mlflow server` on loopback): a better challenger
becomes champion, a worse one is refused and champion stays, rollback restores the previous
champion, missing things are refused with a non-zero exit, and two racing promotions leave the
aliases consistent."""
from __future__ import annotations

import threading

import pytest

from date_core.runtime.promotion import Gate, PromotionError, decide

MODEL = "test-promote-seeker"


def test_gate_margin_and_guards():
    tag = "live_test"
    champ = {f"{tag}/pg/acc@0.5": 0.40, f"{tag}/pr/R@1": 0.50, f"{tag}/pg/mIoU": 0.30}
    better = {f"{tag}/pg/acc@0.5": 0.45, f"{tag}/pr/R@1": 0.495, f"{tag}/pg/mIoU": 0.31}
    gate = Gate("pg/acc@0.5", margin=0.02, guards=("pr/R@1", "pg/mIoU"), tolerance=0.01)
    assert decide(better, champ, gate, tag)[0]
    assert not decide(better, champ, Gate("pg/acc@0.5", margin=0.1), tag)[0]            # wins, not by the margin
    ok, reasons = decide(better, champ, Gate("pg/acc@0.5", 0.0, ("pr/R@1",), 0.001), tag)  # loses a guard
    assert not ok and "guard pr/R@1" in reasons[-1]
    assert decide(better, None, gate, tag) == (True, ["no current champion"])
    with pytest.raises(PromotionError, match="undefined"):
        decide({f"{tag}/pg/acc@0.5": float("nan")}, champ, gate, tag)


def _cli():
    from date_pipelines import promote

    return promote


@pytest.fixture(scope="module")
def registry(mlflow_server, pw_dataset, tmp_path_factory):
    """Three registered versions of tiny seekers (random weights, one seed each), ranked by their
    live/test mIoU; yields (client, {"worst", "mid", "best"} -> version, metrics by version)."""
    import os

    import torch
    from mlflow.tracking import MlflowClient

    from date_core import build_model
    from date_core.inference import save_checkpoint
    from date_core.runtime import tracking
    from date_core.text import load_tokenizer

    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    tmp = tmp_path_factory.mktemp("promote")
    tok = load_tokenizer(pw_dataset / "tokenizer")
    exp = tracking.setup("test-promote")
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    scores = {}
    for seed in range(3):
        torch.manual_seed(seed)
        folder = save_checkpoint(build_model("tiny", vocab_size=len(tok)), tmp / f"seed{seed}", tok)
        run_id, _ = tracking.start_or_resume(exp, f"seed{seed}", "train")
        version = tracking.log_and_register(run_id, folder, MODEL, {})
        tracking.end_run(run_id)
        scores[version] = tracking.evaluate_model(str(folder), str(pw_dataset), "live", "test")["live_test/pg/mIoU"]
    ranked = sorted(scores, key=scores.get)
    assert len(set(scores.values())) == 3, scores  # three distinct seekers to rank
    try:
        yield client, dict(zip(("worst", "mid", "best"), ranked))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def _alias(client, alias):
    from date_core.runtime.promotion import alias_version

    return alias_version(client, MODEL, alias)


def test_promote_both_ways_rollback_and_refusals(registry, pw_dataset):
    client, v = registry
    cli = _cli()
    base = ["--model", MODEL, "--data", str(pw_dataset), "--metric", "pg/mIoU", "--margin", "0", "--guard", "pr/R@1",
            "--tolerance", "1.0", "--set", "runtime.experiment=test-promote"]
    assert cli.main(["--version", v["worst"], *base]) == 0  # no champion yet
    assert _alias(client, "champion") == v["worst"]
    assert cli.main(["--version", v["best"], *base]) == 0  # better: promoted
    assert _alias(client, "champion") == v["best"] and _alias(client, "challenger") == v["best"]
    assert cli.main(["--version", v["mid"], *base]) == cli.REFUSED  # worse: refused, champion unchanged
    assert _alias(client, "champion") == v["best"] and _alias(client, "challenger") == v["mid"]

    refused = client.get_model_version(MODEL, v["mid"])
    assert refused.tags["date.promotion.decision"] == "refused" and refused.tags["date.promotion.against"] == v["best"]
    assert "date.promotion.challenger.live_test/pg/mIoU" in refused.tags
    assert "date.promotion.champion.live_test/pg/mIoU" in refused.tags
    assert "| live_test/pg/mIoU |" in refused.description and "refused against champion" in refused.description
    assert client.get_model_version(MODEL, v["best"]).tags["date.promotion.replaced"] == v["worst"]

    assert cli.main(["--rollback", *base]) == 0
    assert _alias(client, "champion") == v["worst"]
    assert cli.main(["--rollback", *base]) == cli.MISSING  # the first champion replaced nothing

    # missing version, model, run and evaluation data: a clear refusal, non-zero exit
    assert cli.main(["--version", "99", *base]) == cli.MISSING
    assert cli.main(["--version", "1", *base, "--model", "no-such-model"]) == cli.MISSING
    assert cli.main(["--run", "0" * 32, *base]) == cli.MISSING
    assert cli.main(["--version", v["mid"], *base, "--split", "nosplit"]) == cli.MISSING
    assert _alias(client, "champion") == v["worst"]
    # a typo'd promote key is refused like any other config key
    with pytest.raises(SystemExit, match="did you mean 'promote.margin'"):
        cli.main(["--version", v["mid"], *base, "--set", "promote.margn=0.1"])


def test_racing_promotions_leave_aliases_consistent(registry, pw_dataset):
    """Both challengers read the same champion, then both try to move it: the second finds it
    moved under the lock, compares again against the new champion, and decides on that."""
    from date_core.runtime import promotion, tracking

    client, v = registry
    client.set_registered_model_alias(MODEL, "champion", v["worst"])
    for version in (v["mid"], v["best"]):
        client.delete_model_version_tag(MODEL, version, "date.promotion.replaced")
    both_read_champion = threading.Barrier(2, timeout=120)
    cache: dict[str, dict] = {}

    def evaluate(uri: str) -> dict:
        if uri.endswith(f"/{v['worst']}"):  # the champion both started from
            both_read_champion.wait()
        if uri not in cache:
            cache[uri] = tracking.evaluate_model(uri, str(pw_dataset), "live", "test")
        return cache[uri]

    gate = Gate("pg/mIoU", 0.0, (), 0.0)
    results: dict[str, object] = {}

    def run(version: str) -> None:
        try:
            results[version] = promotion.promote(client, MODEL, version, gate, evaluate, "live_test", "race")
        except Exception as exc:  # surfaced by the assertions below
            results[version] = exc

    threads = [threading.Thread(target=run, args=(v[k],)) for k in ("mid", "best")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert all(isinstance(r, promotion.Decision) for r in results.values()), results
    first = next(d for d in results.values() if d.champion == v["worst"])
    second = next(d for d in results.values() if d is not first)
    assert first.promote and second.champion == first.challenger  # compared again, against the new champion
    assert second.promote == (second.challenger == v["best"])
    champion = _alias(client, "champion")
    assert champion == v["best"]
    # the chain of replaced champions leads from the champion back to where both started
    chain, node = [], champion
    while node:
        chain.append(node)
        node = client.get_model_version(MODEL, node).tags.get("date.promotion.replaced")
    assert chain[-1] == v["worst"] and all(d.challenger in chain for d in results.values() if d.promote)
    assert not client.search_registered_models(f"name='{MODEL}{promotion.LOCK_SUFFIX}'")


def test_a_registered_version_loads_as_a_pyfunc_that_embeds_queries(registry, tmp_path):
    """The registry holds the seeker as code plus its checkpoint (no pickled object): any MLflow
    client loads a version and gets one finite embedding per query, as the signature says."""
    import mlflow
    import numpy as np
    import pandas as pd

    _, v = registry
    # dst_path: without it MLflow downloads the version into a temporary folder it never removes
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{v['best']}", dst_path=str(tmp_path))
    assert [c.name for c in model.metadata.signature.inputs.inputs] == ["query"]
    out = model.predict(pd.DataFrame({"query": ["red running shoe", "blue handbag", "red running shoe"]}))
    assert out.shape[0] == 3 and out.ndim == 2 and np.isfinite(out).all()
    assert np.allclose(out[0], out[2]) and not np.allclose(out[0], out[1])
