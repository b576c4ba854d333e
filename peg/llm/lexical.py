"""BM25 of (query, passage) pairs with a corpus's statistics: the lexical half of the
`bm25_biencoder` teacher (docs/methods.md §6).

Tokens are bm25s's (lower-cased words of two or more characters, English stop words removed),
stemmed with the Snowball English stemmer (PyStemmer). Scores are Lucene's BM25 (bm25s's default
`method="lucene"`): for each query token t present in the passage,
idf(t) x tf / (tf + k1 x (1 - b + b x |passage| / avgdl)), idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)),
with N, df and avgdl from the corpus. A passage need not be in the corpus (a pseudo-query's positive
with its sentence cut out is not); a token the corpus lacks gets df 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

K1 = 1.5
B = 0.75


class BM25Scorer:
    """Scores (query, passage) pairs by BM25 with the statistics of the corpus it was built on."""

    def __init__(self, corpus_texts: Iterable[str], k1: float = K1, b: float = B):
        import Stemmer

        self.stemmer = Stemmer.Stemmer("english")
        self.k1, self.b = k1, b
        document_frequency: Counter[str] = Counter()
        documents = total_length = 0
        for tokens in self.tokenize(list(corpus_texts)):
            document_frequency.update(set(tokens))
            documents += 1
            total_length += len(tokens)
        if not documents:
            raise ValueError("BM25Scorer: the corpus has no passages")
        self.documents = documents
        self.avgdl = total_length / documents or 1.0
        self.document_frequency = document_frequency

    def tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(list(texts), stopwords="en", stemmer=self.stemmer, return_ids=False, show_progress=False)

    def idf(self, token: str) -> float:
        df = self.document_frequency.get(token, 0)
        return math.log(1 + (self.documents - df + 0.5) / (df + 0.5))

    def score(self, queries: Sequence[str], passages: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """BM25 of each (queries[i], passages[i]); each distinct text is tokenised once."""
        if len(queries) != len(passages):
            raise ValueError(f"BM25Scorer.score: {len(queries)} queries but {len(passages)} passages")
        unique_q, unique_p = list(dict.fromkeys(queries)), list(dict.fromkeys(passages))
        query_tokens = dict(zip(unique_q, self.tokenize(unique_q), strict=True))
        passage_terms = {}  # text -> (term counts, its length normaliser), once per distinct passage
        for text, tokens in zip(unique_p, self.tokenize(unique_p), strict=True):
            passage_terms[text] = (Counter(tokens), self.k1 * (1 - self.b + self.b * len(tokens) / self.avgdl))
        out = np.zeros(len(queries), dtype=np.float32)
        for i, (query, passage) in enumerate(zip(queries, passages, strict=True)):
            counts, norm = passage_terms[passage]
            out[i] = sum(self.idf(t) * counts[t] / (counts[t] + norm) for t in query_tokens[query] if counts[t])
        return out
