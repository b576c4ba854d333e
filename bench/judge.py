"""LLM judge: peg's one-forward scoring vs `generate()`-based judging, same model, prompt and batch.

    nice -n 19 python bench/judge.py [--pairs 48 --batch 8 --new-tokens 8]

peg (`LLMScorer`, mode yes_no): one batched forward pass, P(yes) / (P(yes) + P(no)) from the next-token
logits, decision P(yes) > 0.5. The peer: `model.generate(..., do_sample=False, max_new_tokens=N)` on
the same chat prompt, decision = the answer starts with "yes" (an answer with neither yes nor no is
"undecided"). Model: SmolLM2-135M-Instruct (the packaged GGUF, fp32). Writes
bench/results/judge.json / .md / .png: pairs/s and the agreement of the decisions.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, passage_lengths, words  # noqa: E402


def pairs(count: int) -> tuple[list[str], list[str]]:
    """Half related (query words taken from the passage), half unrelated, of spread lengths."""
    rng = random.Random(0)
    queries, passages = [], []
    for i, n in enumerate(passage_lengths(rng, count, 60)):
        passage = words(rng, n)
        picked = passage.split()[:4] if i % 2 == 0 else words(rng, 4).split()
        queries.append("what is the role of " + " ".join(picked) + "?")
        passages.append(passage)
    return queries, passages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()

    import torch

    from peg.config import LLMConfig
    from peg.llm.loading import load_causal_lm
    from peg.llm.backends import left_pad
    from peg.llm.scorer import LLMScorer

    config = LLMConfig(mode="yes_no", batch_size=args.batch)
    model, tokenizer = load_causal_lm(config)
    scorer = LLMScorer(config, model=model, tokenizer=tokenizer)
    queries, passages = pairs(args.pairs)
    results = Results("judge", "LLM judge: peg one-forward P(yes) vs generate()", vars(args),
                      ["tool", "seconds", "pairs_per_s", "vs generate", "undecided"])  # fmt: skip

    start = time.perf_counter()
    generated: list[str] = []
    with torch.no_grad():
        for s in range(0, len(queries), args.batch):
            seqs = [scorer._yes_no_sequence(q, p) for q, p in zip(queries[s : s + args.batch], passages[s : s + args.batch])]
            batch = left_pad(seqs, scorer.lm.pad_id)
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                                 max_new_tokens=args.new_tokens, pad_token_id=scorer.lm.pad_id)  # fmt: skip
            generated += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    generate_s = time.perf_counter() - start
    answers = [g.strip().lower() for g in generated]
    gen_yes = [a.startswith("yes") if a.startswith(("yes", "no")) else None for a in answers]
    results.add({"tool": f"generate() ({args.new_tokens} new tokens)", "seconds": generate_s,
                 "pairs_per_s": len(queries) / generate_s, "vs generate": 1.0,
                 "undecided": sum(g is None for g in gen_yes)})  # fmt: skip

    start = time.perf_counter()
    scores = scorer.score(queries, passages)
    peg_s = time.perf_counter() - start
    peg_yes = [bool(s > 0.5) for s in scores]
    results.add({"tool": "peg LLMScorer yes_no (1 forward)", "seconds": peg_s, "pairs_per_s": len(queries) / peg_s,
                 "vs generate": generate_s / peg_s, "undecided": 0})  # fmt: skip
    decided = [(p, g) for p, g in zip(peg_yes, gen_yes) if g is not None]
    agree = sum(p == g for p, g in decided)
    results.note(f"decisions agree on {agree} of {len(decided)} pairs where generate() answered yes/no "
                 f"({len(queries) - len(decided)} generated answers were neither); first answers: "
                 f"{[a[:20] for a in answers[:4]]}")  # fmt: skip
    results.bar_chart("tool", "pairs_per_s", "pairs / s (higher is better)")


if __name__ == "__main__":
    main()
