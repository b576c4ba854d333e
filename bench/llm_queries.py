"""What each offline LLM writes as a synthetic query: a few SciFact passages, greedy few-shot
generation (peg.llm.synth.QueryWriter), one table.

The passages are the first relevant passage of a seeded subset of SciFact TEST queries, so the
table shows the real SciFact query (a claim) beside what each LLM wrote. An instruct model with a
chat template gets the few-shot chat; a base model without one (google/gemma-3-270m) gets the
plain-text few-shot prompt (`peg.llm.synth.few_shot_text`). Greedy (temperature 0), at most
`--max-new-tokens`; the models are loaded one after the other. Writes `<out>.md` and `<out>.json`.

    PEG_SCIFACT=../shared/data/scifact nice -n 19 .venv/bin/python bench/llm_queries.py \\
        [--llm HuggingFaceTB/SmolLM2-135M-Instruct --llm google/gemma-3-270m] [--passages 6] \\
        [--types question claim] [--out bench/results/llm_queries]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.scifact import ROOT, SCIFACT, seeded_subset
from peg.config import LLMConfig, SynthConfig
from peg.data import BeirDataset

DEFAULT_LLMS = ["HuggingFaceTB/SmolLM2-135M-Instruct", "google/gemma-3-270m"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", action="append", help=f"A packaged id or model folder; repeat for several (default: {DEFAULT_LLMS}).")
    parser.add_argument("--passages", type=int, default=6)
    parser.add_argument("--types", nargs="+", default=["question", "claim"])
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "llm_queries"))
    args = parser.parse_args()
    llms = args.llm or DEFAULT_LLMS

    import torch

    from peg.llm.synth import QueryWriter

    torch.set_num_threads(2)
    data = BeirDataset.load(SCIFACT, "test")
    qids = seeded_subset([q for q in data.queries if data.qrels.get(q)], args.passages, args.seed)
    rows = [{"query_id": q, "scifact_query": data.queries[q], "passage_id": sorted(data.qrels[q])[0]} for q in qids]
    jobs = [(data.corpus[r["passage_id"]].full_text, t) for r in rows for t in args.types]
    runs = {}
    for llm in llms:
        config = SynthConfig(llm=LLMConfig(path=llm, batch_size=len(jobs)), temperature=0.0, max_new_tokens=args.max_new_tokens)
        started = time.monotonic()
        writer = QueryWriter(config)
        loaded = time.monotonic()
        written = writer.write(jobs, seed=args.seed)
        runs[llm] = {
            "prompt": "chat template" if writer.has_chat_template else "plain-text few-shot",
            "load_seconds": round(loaded - started, 1),
            "generate_seconds": round(time.monotonic() - loaded, 1),
            "queries": written,
        }
        print(f"{llm}: {runs[llm]['prompt']}, {len(jobs)} queries in {runs[llm]['generate_seconds']} s", flush=True)
        del writer
    result = {
        "passages": rows, "types": args.types, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
        "passage_text": {r["passage_id"]: data.corpus[r["passage_id"]].full_text for r in rows}, "llms": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if text else "*(empty)*"


def markdown(result: dict) -> str:
    llms = result["llms"]
    lines = [
        "# Synthetic queries: what each offline LLM writes (SciFact, greedy few-shot)",
        "",
        f"{len(result['passages'])} SciFact TEST queries (seed {result['seed']}), each with its first relevant passage "
        f"(shown cut to 300 characters; the LLMs saw up to 2000). Greedy, at most {result['max_new_tokens']} new tokens, "
        "first line kept (`peg.llm.synth.clean_query`). CPU, 2 threads, all prompts in one batch per model.",
        "",
        "| LLM | prompt | load s | generate s |",
        "|---|---|---:|---:|",
        *(f"| {name} | {r['prompt']} | {r['load_seconds']:.0f} | {r['generate_seconds']:.0f} |" for name, r in llms.items()),
        "",
        "| passage | SciFact query | type | " + " | ".join(n.split("/")[-1] for n in llms) + " |",
        "|---|---|---|" + "---|" * len(llms),
    ]
    i = 0
    for row in result["passages"]:
        text = result["passage_text"][row["passage_id"]]
        shown = text[:300] + ("…" if len(text) > 300 else "")
        passage, query = cell(f"{row['passage_id']}: {shown}"), cell(row["scifact_query"])
        for j, t in enumerate(result["types"]):
            written = " | ".join(cell(r["queries"][i]) for r in llms.values())
            lines.append(f"| {passage if j == 0 else ''} | {query if j == 0 else ''} | {t} | {written} |")
            i += 1
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
