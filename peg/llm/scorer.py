"""LLM relevance scoring of (query, passage) pairs, batched, no sampling (docs/methods.md §6).

Two modes (`LLMConfig.mode`):
- `yes_no`: a yes/no relevance question through the tokenizer's chat template; the score is
  P(yes) / (P(yes) + P(no)) from the next-token logits of one batched forward pass (the
  probabilities of the "yes"/"Yes" tokens are summed, likewise for no). The production choice
  for instruct LLMs of ~1B parameters and more; too small models answer at random.
- `query_likelihood` (UPR, Sachan et al. 2022): the mean log-probability of the query's tokens
  given the passage and the instruction "Write a question that this passage answers.", one
  batched teacher-forced forward pass. Works with small models (SmolLM2-135M).

The forward passes run on `llm.backend` (peg/llm/backends.py: transformers, or CTranslate2 for
CPU speed); a pair scores the same alone or in any batch. Passages are cut to `max_passage_chars`.
In query_likelihood mode on the transformers backend on CPU, a passage paired with several queries (a
teacher's candidate lists, the round-trip filter's top k) has its prompt run once and each query
run on the cached keys and values: one passage prefill instead of one per pair, equal scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from peg.config import LLMConfig
from peg.llm.backends import as_backend, load_lm
from peg.llm.loading import LLMError
from peg.progress import progress_bar

YES_NO_PROMPT = (
    "Query: {query}\n\nPassage: {passage}\n\n"
    "Does the passage answer the query or contain information relevant to it? Answer yes or no."
)
QUERY_LIKELIHOOD_PROMPT = "Passage: {passage}\n\nWrite a question that this passage answers."
YES_TOKENS = ("yes", "Yes", " yes", " Yes", "YES")
NO_TOKENS = ("no", "No", " no", " No", "NO")


def single_token_ids(tokenizer, variants: Sequence[str]) -> list[int]:
    """Ids of the variants that the tokenizer encodes as exactly one token (deduplicated)."""
    ids = []
    for text in variants:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


class LLMScorer:
    """Scores (query, passage) pairs; higher means more relevant. See the module doc for the modes.

    `model` is a backend (peg.llm.backends) or a transformers causal LM; without one, `config`'s
    model is loaded on `config.backend`."""

    def __init__(self, config: LLMConfig, model=None, tokenizer=None):
        self.config = config
        if model is None or tokenizer is None:
            model, tokenizer = load_lm(config)
        self.lm = as_backend(model, tokenizer)
        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        if config.mode == "yes_no":
            if not self.has_chat_template:
                where = config.path or config.gguf_file or "the given tokenizer"
                raise LLMError(
                    f"llm.mode 'yes_no' needs a tokenizer with a chat template; the model at {where} has none "
                    "(use an instruct model, or llm.mode 'query_likelihood')"
                )
            self.yes_ids = single_token_ids(tokenizer, YES_TOKENS)
            self.no_ids = single_token_ids(tokenizer, NO_TOKENS)
            if not self.yes_ids or not self.no_ids:
                raise LLMError("llm.mode 'yes_no': the tokenizer has no single-token 'yes'/'no'")

    def _chat_prefix(self, content: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _yes_no_sequence(self, query: str, passage: str) -> list[int]:
        return self._chat_prefix(YES_NO_PROMPT.format(query=query, passage=passage[: self.config.max_passage_chars]))

    def _likelihood_sequence(self, query: str, passage: str) -> tuple[list[int], int]:
        """Prompt + query token ids, and the number of query tokens at the end."""
        instruction = QUERY_LIKELIHOOD_PROMPT.format(passage=passage[: self.config.max_passage_chars])
        if self.has_chat_template:
            prefix = self._chat_prefix(instruction)
        else:
            prefix = self.tokenizer.encode(instruction + "\nQuestion:", add_special_tokens=True)
        query_ids = self.tokenizer.encode(query if self.has_chat_template else " " + query, add_special_tokens=False)
        if not query_ids:
            raise LLMError(f"query {query!r} has no tokens")
        return prefix + query_ids, len(query_ids)

    def _score_batch(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        if self.config.mode == "yes_no":
            logits = self.lm.next_token_logits([self._yes_no_sequence(q, p) for q, p in zip(queries, passages)])
            margin = torch.logsumexp(logits[:, self.yes_ids], dim=-1) - torch.logsumexp(logits[:, self.no_ids], dim=-1)
            return torch.sigmoid(margin).numpy()
        sequences, query_lengths = zip(*(self._likelihood_sequence(q, p) for q, p in zip(queries, passages)))
        return self.lm.continuation_log_probs(list(sequences), list(query_lengths))

    def score(
        self, queries: Sequence[str], passages: Sequence[str], show_progress: bool = False
    ) -> np.ndarray:
        """Scores (float32) of the pairs (queries[i], passages[i]), in input order."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        scores = np.empty(len(queries), dtype=np.float32)
        pending = list(range(len(queries)))
        with progress_bar(len(queries), f"LLM {self.config.mode}", enabled=show_progress, unit="pairs") as advance:
            if self.config.mode == "query_likelihood" and self.lm.reuses_prefix:
                pending = self._score_shared_passages(queries, passages, scores, advance)
            order = sorted(pending, key=lambda i: -(len(queries[i]) + min(len(passages[i]), self.config.max_passage_chars)))
            size = self.config.batch_size
            for start in range(0, len(order), size):
                idx = order[start : start + size]
                scores[idx] = self._score_batch([queries[i] for i in idx], [passages[i] for i in idx])
                advance(len(idx))
        return scores

    def _score_shared_passages(self, queries: Sequence[str], passages: Sequence[str], scores: np.ndarray, advance) -> list[int]:
        """query_likelihood on a backend that reuses a prefix: each passage paired with two or more
        queries has its prompt run once (`batch_size` such prompts in one batch), and those queries
        run on its cached keys and values. Returns the pairs left to score in batches (each
        passage's only pair)."""
        groups: dict[str, list[int]] = {}
        for i, passage in enumerate(passages):
            groups.setdefault(passage[: self.config.max_passage_chars], []).append(i)
        single = [rows[0] for rows in groups.values() if len(rows) == 1]
        shared = []
        for rows in (rows for rows in groups.values() if len(rows) > 1):
            sequences = [self._likelihood_sequence(queries[i], passages[i]) for i in rows]
            shared.append((rows, sequences[0][0][: -sequences[0][1]], [seq[-n:] for seq, n in sequences]))
        shared.sort(key=lambda group: len(group[1]))  # prefixes of like lengths pad less
        size = self.config.batch_size
        for start in range(0, len(shared), size):  # batch_size passages prefilled together
            block = shared[start : start + size]
            block_scores = self.lm.shared_prefix_log_probs([(prefix, conts) for _, prefix, conts in block], size)
            for (rows, _, _), group_scores in zip(block, block_scores, strict=True):
                scores[rows] = group_scores
            advance(sum(len(rows) for rows, _, _ in block))
        return single
