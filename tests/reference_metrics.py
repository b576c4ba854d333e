"""An independent, hand-written implementation of trec_eval's measures, for tests only.

trec_eval ranks a query's documents by score descending, ties by document id descending;
relevant means relevance > 0; nDCG gains are the relevance values with a log2(rank + 1) discount.
"""

import math


def ranked(docs: dict[str, float]) -> list[str]:
    return [d for d, _ in sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)]


def reference_metrics(qrels, run, k_values=(10, 100)):
    cut = max(k_values)
    totals = {"ndcg@10": 0.0, f"map@{cut}": 0.0, "mrr@10": 0.0, **{f"recall@{k}": 0.0 for k in k_values}}
    judged = {q: d for q, d in qrels.items() if d}
    for qid, rels in judged.items():
        order = ranked(run.get(qid, {}))
        relevant = {d for d, r in rels.items() if r > 0}
        dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(order[:10]) if rels.get(d, 0) > 0)
        ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:10]
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
        totals["ndcg@10"] += dcg / idcg if idcg else 0.0
        hits, precision_sum = 0, 0.0
        for i, d in enumerate(order[:cut]):
            if d in relevant:
                hits += 1
                precision_sum += hits / (i + 1)
        totals[f"map@{cut}"] += precision_sum / len(relevant) if relevant else 0.0
        first = next((i for i, d in enumerate(order[:10]) if d in relevant), None)
        totals["mrr@10"] += 1 / (first + 1) if first is not None else 0.0
        for k in k_values:
            totals[f"recall@{k}"] += len(relevant & set(order[:k])) / len(relevant) if relevant else 0.0
    return {name: value / len(judged) for name, value in totals.items()}
