"""The CTranslate2 backend equals the transformers backend where it claims to (float32 scores,
greedy generations), and its conversion is cached by the model folder's content; the transformers
backend in bfloat16 scores within bf16 rounding of float32; compute types a backend cannot run are
refused.

The model is the session's tiny random Llama with the SmolLM2 tokenizer (tests/tiny.py); speed is
measured in bench/llm_backends.py, not here.
"""

from __future__ import annotations

import copy
import shutil

import ctranslate2
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from peg.config import LLMConfig, SynthConfig
from peg.llm import LLMScorer, QueryWriter
from peg.llm.backends import CTranslate2LM, TransformersLM, convert_ctranslate2, load_lm
from peg.llm.loading import LLMError
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


def test_bfloat16_runs_in_bf16_and_scores_as_float32_up_to_rounding(backends, tiny_llama_dir):
    """`compute_type: bfloat16` on the transformers path: the weights are bf16, and a passage scored
    with its prefix reused gives the whole prompts' numbers, both within bf16 rounding of float32."""
    (ref_lm, tok), _ = backends
    bf16_lm, _ = load_lm(LLMConfig(path=str(tiny_llama_dir), compute_type="bfloat16"))
    assert {p.dtype for p in bf16_lm.model.parameters()} == {torch.bfloat16}
    config = LLMConfig(path="tiny", mode="query_likelihood", batch_size=3)
    queries, passages = zip(*PAIRS)
    want = LLMScorer(config, ref_lm, tok).score(queries, passages)
    got = LLMScorer(config, bf16_lm, tok).score(queries, passages)
    assert not np.allclose(got, want, rtol=0, atol=1e-6)  # bf16 really ran: the numbers moved
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * np.ptp(want))  # 7e-4 of a 0.2 spread here
    shared = [("a first query", PAIRS[0][1]), ("a second, longer query here", PAIRS[0][1]), (PAIRS[0][0], PAIRS[0][1])]
    reused = LLMScorer(config, bf16_lm, tok).score(*zip(*shared))
    whole = copy.copy(bf16_lm)
    whole.reuses_prefix = False
    np.testing.assert_allclose(reused, LLMScorer(config, whole, tok).score(*zip(*shared)), rtol=0, atol=0.005)


def test_compute_types_a_backend_cannot_run_are_refused(tiny_llama_dir):
    with pytest.raises(ValidationError, match="compute_type int8 needs backend ctranslate2"):
        LLMConfig(path=str(tiny_llama_dir), compute_type="int8")
    if "bfloat16" in ctranslate2.get_supported_compute_types("cpu") or ctranslate2.get_cuda_device_count():
        pytest.skip("this ctranslate2 build runs bfloat16 here")
    with pytest.raises(LLMError, match="compute_type bfloat16 is not supported by ctranslate2 on this cpu"):
        load_lm(LLMConfig(path=str(tiny_llama_dir), backend="ctranslate2", compute_type="bfloat16"))
