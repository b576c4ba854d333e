"""Retrieval metrics computed by trec_eval's own code (pytrec_eval; docs/methods.md §8).

Reported measures, named as BEIR/MTEB name them, for the cut-offs `k_values` (`eval.k_values`,
default 10 and 100) with K = max(k_values):
  ndcg@10    trec_eval ndcg_cut_10
  mrr@10     trec_eval recip_rank on the run cut to its top 10 (trec_eval has no MRR cutoff)
  map@K      trec_eval map_cut_K
  recall@k   trec_eval recall_k, for each k in k_values
A run must hold at least max(10, K) documents per query (`search_depth`). Values are means over
the queries that have qrels (trec_eval's default, without -c).
"""

from __future__ import annotations

import pytrec_eval

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

DEFAULT_K = (10, 100)


def search_depth(k_values: tuple[int, ...]) -> int:
    """Documents to retrieve per query so every reported measure is exact."""
    return max(10, *k_values)


def top_k(run: Run, k: int) -> Run:
    """Each query's k best documents, ordered as trec_eval orders them (score desc, docid desc)."""
    return {
        qid: dict(sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k])
        for qid, docs in run.items()
    }


def per_query_metrics(qrels: Qrels, run: Run, k_values: tuple[int, ...] = DEFAULT_K) -> dict[str, dict[str, float]]:
    """{query id: {measure: value}} for every query in qrels (absent from run -> zeros)."""
    judged = {qid: docs for qid, docs in qrels.items() if docs}
    cut = max(k_values)
    full = pytrec_eval.RelevanceEvaluator(
        judged, {"ndcg_cut.10", f"map_cut.{cut}", *(f"recall.{k}" for k in k_values)}
    ).evaluate(run)
    rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top_k(run, 10))
    out: dict[str, dict[str, float]] = {}
    for qid in judged:
        values = full.get(qid, {})
        row = {
            "ndcg@10": values.get("ndcg_cut_10", 0.0),
            f"map@{cut}": values.get(f"map_cut_{cut}", 0.0),
            "mrr@10": rr.get(qid, {}).get("recip_rank", 0.0),
        }
        row.update({f"recall@{k}": values.get(f"recall_{k}", 0.0) for k in sorted(k_values)})
        out[qid] = row
    return out


def compute_metrics(qrels: Qrels, run: Run, k_values: tuple[int, ...] = DEFAULT_K) -> dict[str, float]:
    """Mean of each measure over the queries with qrels; unretrieved queries count as 0."""
    rows = per_query_metrics(qrels, run, tuple(k_values))
    if not rows:
        raise ValueError("no judged queries: qrels are empty")
    names = next(iter(rows.values())).keys()
    return {name: sum(r[name] for r in rows.values()) / len(rows) for name in names}
