"""The CTranslate2 backend equals the transformers backend where it claims to (float32 scores,
greedy generations), and its conversion is cached by the model folder's content.

The model is the session's tiny random Llama with the SmolLM2 tokenizer (tests/tiny.py); speed is
measured in bench/llm_backends.py, not here.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from peg.config import LLMConfig, SynthConfig
from peg.llm import LLMScorer, QueryWriter
from peg.llm.backends import CTranslate2LM, TransformersLM, convert_ctranslate2, load_lm
from test_llm_scorer import PAIRS

JOBS = [
    ("Paris is the capital of France.", "question"),
    ("Bees make honey from nectar they collect from flowers, and store it in wax combs.", "keywords"),
    ("Tea.", "title"),
]


@pytest.fixture(scope="module")
def backends(tiny_llama_dir, tmp_path_factory):
    """(transformers, ctranslate2 float32) backends over the same tiny Llama folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEG_CACHE_DIR", str(tmp_path_factory.mktemp("peg-cache")))
        reference = load_lm(LLMConfig(path=str(tiny_llama_dir)))
        fast = load_lm(LLMConfig(path=str(tiny_llama_dir), backend="ctranslate2", compute_type="float32"))
    assert isinstance(reference[0], TransformersLM) and isinstance(fast[0], CTranslate2LM)
    return reference, fast


@pytest.mark.parametrize("mode", ["query_likelihood", "yes_no"])
def test_float32_scores_equal_the_transformers_path(backends, mode):
    (ref_lm, tok), (fast_lm, _) = backends
    config = LLMConfig(path="tiny", mode=mode, batch_size=3)
    queries, passages = zip(*PAIRS)
    want = LLMScorer(config, ref_lm, tok).score(queries, passages)
    got = LLMScorer(config, fast_lm, tok).score(queries, passages)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.ptp(want) > 1e-3  # the pairs score differently: equality is not trivial


def test_greedy_generations_equal_the_transformers_path(backends):
    (ref_lm, tok), (fast_lm, _) = backends
    config = SynthConfig(llm=LLMConfig(path="tiny", batch_size=2), temperature=0.0, max_new_tokens=8)
    want = QueryWriter(config, ref_lm, tok).write(JOBS, seed=0)
    got = QueryWriter(config, fast_lm, tok).write(JOBS, seed=0)
    assert got == want
    assert any(want)  # something was generated
    ids = fast_lm.generate([tok.encode("Hello there")], max_new_tokens=8, temperature=0.0, seed=0)
    assert ids == ref_lm.generate([tok.encode("Hello there")], max_new_tokens=8, temperature=0.0, seed=0)
    assert len(ids[0]) == 8 or ids[0][-1:] != fast_lm.end_ids[:1]


def test_sampled_generation_samples(backends):
    """CTranslate2 sampling is seeded but not reproducible within a process (its per-thread random
    generators are seeded once: OpenNMT/CTranslate2#1757); what holds is that it samples."""
    (_, tok), (fast_lm, _) = backends
    config = SynthConfig(llm=LLMConfig(path="tiny", batch_size=2), temperature=1.0, max_new_tokens=6)
    greedy = QueryWriter(config.model_copy(update={"temperature": 0.0}), fast_lm, tok).write(JOBS, seed=5)
    sampled = [QueryWriter(config, fast_lm, tok).write(JOBS, seed=5) for _ in range(3)]
    assert all(s != greedy for s in sampled)
    assert all(len(s) == len(JOBS) for s in sampled)


def test_conversion_is_cached_by_folder_content(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PEG_CACHE_DIR", str(tmp_path / "cache"))
    first = convert_ctranslate2(tiny_llama_dir)
    stamp = (first / "model.bin").stat().st_mtime_ns
    assert convert_ctranslate2(tiny_llama_dir) == first  # not converted again
    assert (first / "model.bin").stat().st_mtime_ns == stamp
    changed = shutil.copytree(tiny_llama_dir, tmp_path / "changed")
    (changed / "generation_config.json").write_text((changed / "generation_config.json").read_text() + "\n")
    assert convert_ctranslate2(changed) != first  # a changed file is another model
    assert sorted(p.name for p in (tmp_path / "cache" / "ct2").iterdir() if p.is_dir()) == sorted(
        [first.name, convert_ctranslate2(changed).name]
    )
