"""Retrieval metrics computed by trec_eval's own code (pytrec_eval).

Reported measures, named as BEIR/MTEB name them:
  ndcg@10    trec_eval ndcg_cut_10
  map@100    trec_eval map_cut_100
  mrr@10     trec_eval recip_rank on the run cut to its top 10 (trec_eval has no MRR cutoff)
  recall@k   trec_eval recall_k
Values are means over the queries that have qrels (trec_eval's default, without -c).
"""

from __future__ import annotations

import pytrec_eval

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

MEASURES = ("ndcg@10", "map@100", "mrr@10", "recall@10", "recall@100")


def top_k(run: Run, k: int) -> Run:
    """Each query's k best documents, ordered as trec_eval orders them (score desc, docid desc)."""
    return {
        qid: dict(sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k])
        for qid, docs in run.items()
    }


def per_query_metrics(qrels: Qrels, run: Run, recall_k: tuple[int, ...] = (10, 100)) -> dict[str, dict[str, float]]:
    """{query id: {measure: value}} for every query in qrels (absent from run -> zeros)."""
    judged = {qid: docs for qid, docs in qrels.items() if docs}
    full = pytrec_eval.RelevanceEvaluator(
        judged, {"ndcg_cut.10", "map_cut.100", *(f"recall.{k}" for k in recall_k)}
    ).evaluate(run)
    rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top_k(run, 10))
    out: dict[str, dict[str, float]] = {}
    for qid in judged:
        values = full.get(qid, {})
        row = {
            "ndcg@10": values.get("ndcg_cut_10", 0.0),
            "map@100": values.get("map_cut_100", 0.0),
            "mrr@10": rr.get(qid, {}).get("recip_rank", 0.0),
        }
        row.update({f"recall@{k}": values.get(f"recall_{k}", 0.0) for k in recall_k})
        out[qid] = row
    return out


def compute_metrics(qrels: Qrels, run: Run, recall_k: tuple[int, ...] = (10, 100)) -> dict[str, float]:
    """Mean of each measure over the queries with qrels; unretrieved queries count as 0."""
    rows = per_query_metrics(qrels, run, recall_k)
    if not rows:
        raise ValueError("no judged queries: qrels are empty")
    names = next(iter(rows.values())).keys()
    return {name: sum(r[name] for r in rows.values()) / len(rows) for name in names}
