"""LLM relevance scoring of (query, passage) pairs, batched, no sampling (docs/methods.md §6).

Two modes (`LLMConfig.mode`):
- `yes_no`: a yes/no relevance question through the tokenizer's chat template; the score is
  P(yes) / (P(yes) + P(no)) from the next-token logits of one batched forward pass (the
  probabilities of the "yes"/"Yes" tokens are summed, likewise for no). The production choice
  for instruct LLMs of ~1B parameters and more; too small models answer at random.
- `query_likelihood` (UPR, Sachan et al. 2022): the mean log-probability of the query's tokens
  given the passage and the instruction "Write a question that this passage answers.", one
  batched teacher-forced forward pass. Works with small models (SmolLM2-135M).

Batches are left-padded with explicit position ids, so a pair scores the same alone or in any
batch. Passages are cut to `max_passage_chars`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from peg.config import LLMConfig
from peg.llm.loading import LLMError, load_causal_lm
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


def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids, attention_mask and position_ids counting from each row's first token."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


class LLMScorer:
    """Scores (query, passage) pairs; higher means more relevant. See the module doc for the modes."""

    def __init__(self, config: LLMConfig, model=None, tokenizer=None):
        self.config = config
        if model is None or tokenizer is None:
            model, tokenizer = load_causal_lm(config)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            self.pad_id = 0  # padded positions are masked out; any id works
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

    @torch.no_grad()
    def _score_batch(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        device = next(self.model.parameters()).device
        if self.config.mode == "yes_no":
            batch = left_pad([self._yes_no_sequence(q, p) for q, p in zip(queries, passages)], self.pad_id)
            logits = self.model(**{k: v.to(device) for k, v in batch.items()}, logits_to_keep=1).logits[:, -1].float()
            margin = torch.logsumexp(logits[:, self.yes_ids], dim=-1) - torch.logsumexp(logits[:, self.no_ids], dim=-1)
            return torch.sigmoid(margin).cpu().numpy()
        sequences, query_lengths = zip(*(self._likelihood_sequence(q, p) for q, p in zip(queries, passages)))
        batch = left_pad(list(sequences), self.pad_id)
        keep = max(query_lengths) + 1
        logits = self.model(**{k: v.to(device) for k, v in batch.items()}, logits_to_keep=keep).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # position j predicts token j + 1
        targets = batch["input_ids"][:, -(keep - 1) :].to(device)
        token_lp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lengths = torch.tensor(query_lengths, device=device)
        mask = torch.arange(keep - 1, device=device).unsqueeze(0) >= (keep - 1 - lengths).unsqueeze(1)
        return ((token_lp * mask).sum(dim=1) / lengths).cpu().numpy()

    def score(
        self, queries: Sequence[str], passages: Sequence[str], show_progress: bool = False
    ) -> np.ndarray:
        """Scores (float32) of the pairs (queries[i], passages[i]), in input order."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        scores = np.empty(len(queries), dtype=np.float32)
        order = np.argsort([-(len(q) + min(len(p), self.config.max_passage_chars)) for q, p in zip(queries, passages)], kind="stable")
        size = self.config.batch_size
        with progress_bar(len(queries), f"LLM {self.config.mode}", enabled=show_progress, unit="pairs") as advance:
            for start in range(0, len(order), size):
                idx = order[start : start + size]
                scores[idx] = self._score_batch([queries[i] for i in idx], [passages[i] for i in idx])
                advance(len(idx))
        return scores
