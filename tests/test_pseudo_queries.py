"""Generation-free pseudo-queries (passage_title, inverse_cloze, span_crop): what is cut, what the
positive keeps, seeding, too-short passages, and the synth stage running them with no LLM at all,
through the round-trip filter and a teacher, and mining training on the positives as cut."""

from __future__ import annotations

import json
import random
from pathlib import Path


from peg.config import RunConfig
from peg.data import Passage, iter_examples
from peg.llm import run_synth
from peg.mine import run_encode, run_mine
from peg.pipeline.runner import stage_scope
from peg.llm.synth import PSEUDO_QUERY_TYPES, pseudo_query
from peg.store import LocalStore

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
PASSAGE = Passage(
    id="d1",
    title="Tidal forces",
    text="The moon pulls on the oceans of the earth. Two high tides a day follow from this pull. "
    "Spring tides happen when the sun and moon align. Short.",
)


def test_passage_title_queries_the_title_and_keeps_the_text():
    assert pseudo_query(PASSAGE, "passage_title", random.Random(0), 12) == ("Tidal forces", PASSAGE.text)
    assert pseudo_query(Passage("d2", "", "No title here at all."), "passage_title", random.Random(0), 12) == ("", "")


def test_inverse_cloze_cuts_one_long_enough_sentence_out_of_the_positive():
    sentences = {"The moon pulls on the oceans of the earth.", "Two high tides a day follow from this pull.",
                 "Spring tides happen when the sun and moon align."}  # fmt: skip
    seen = set()
    for seed in range(30):
        query, positive = pseudo_query(PASSAGE, "inverse_cloze", random.Random(seed), 12)
        assert query in sentences  # "Short." has < 4 words and is never the query
        assert query not in positive and positive.startswith("Tidal forces ")
        assert sorted((positive.removeprefix("Tidal forces ") + " " + query).split()) == sorted(PASSAGE.text.split())
        seen.add(query)
    assert seen == sentences  # the pick varies with the seed
    one_sentence = Passage("d3", "", "Only one sentence lives in this passage")
    assert pseudo_query(one_sentence, "inverse_cloze", random.Random(0), 12) == ("", "")


def test_span_crop_takes_span_words_consecutive_words_and_removes_them():
    words = PASSAGE.full_text.split()
    for seed in range(20):
        query, positive = pseudo_query(PASSAGE, "span_crop", random.Random(seed), 5)
        cut = query.split()
        assert len(cut) == 5 and any(words[i : i + 5] == cut for i in range(len(words) - 4))
        assert len(positive.split()) == len(words) - 5
    assert pseudo_query(PASSAGE, "span_crop", random.Random(3), 5) == pseudo_query(PASSAGE, "span_crop", random.Random(3), 5)
    assert pseudo_query(PASSAGE, "span_crop", random.Random(0), len(words) // 2 + 1) == ("", "")  # too short


TOPICS = ["bees", "tides", "volcanoes", "jazz", "vaccines", "glaciers"]


def write_beir(folder: Path) -> None:
    folder.mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as f:
        for i, t in enumerate(TOPICS):
            text = (f"{t.capitalize()} are studied by many scientists around the world. The study of {t} began long ago "
                    f"in small places. People who love {t} write books about {t} every year. Short one.")  # fmt: skip
            f.write(json.dumps({"_id": f"d{i}", "title": f"All about {t}" if i % 2 == 0 else "", "text": text}) + "\n")


def test_synth_stage_runs_generation_free_types_with_no_llm_and_mining_keeps_the_cut_positives(
    ray_local, tiny_cross_encoder_dir, tmp_path
):
    """synth.llm names no model that exists: only the generation-free types run, so none is loaded.
    The mined training lists then pair each query with its positive as synth cut it, never with the
    corpus passage that still contains the query."""
    write_beir(tmp_path / "beir")
    config = RunConfig.model_validate({
        "name": "free", "model": {"name_or_path": MINILM}, "store": {"uri": str(tmp_path / "store")},
        "data": {"beir": str(tmp_path / "beir"), "train_queries": "synthetic"}, "encode": {"shard_size": 100},
        "mining": {"num_shards": 1, "top_k": 10, "negatives_per_query": 3},
        "synth": {"enabled": True, "llm": {"path": str(tmp_path / "no-such-llm"), "shard_size": 3, "num_actors": 1},
                  "query_types": list(PSEUDO_QUERY_TYPES), "span_words": 6, "filter_top_k": 3},
        "score": {"teacher": "cross_encoder", "cross_encoder_path": str(tiny_cross_encoder_dir)},
    })  # fmt: skip
    report = run_synth(config, stage_scope(config, LocalStore(tmp_path / "store"), "synth"), show_progress=False).report
    assert report["passages"] == len(TOPICS) and report["shards_computed"] == 2
    assert report["by_type"]["passage_title"]["empty"] == len(TOPICS) // 2  # the odd passages have no title
    assert all(report["by_type"][t]["empty"] == 0 for t in ("inverse_cloze", "span_crop"))
    for counts in report["by_type"].values():
        assert sum(counts.values()) == len(TOPICS)
    store = LocalStore(tmp_path / "store")
    records = [json.loads(line) for line in store.local_path("free/synth/queries.jsonl").open()]
    kept = list(iter_examples(store.local_path("free/synth/train.jsonl")))
    assert len(kept) == report["kept"] == sum(r["outcome"] == "kept" for r in records)
    # the round trip and the teacher decide: with a random tiny teacher some are dropped, some kept
    assert 0 < report["kept"] < sum(r["outcome"] != "empty" for r in records)
    for ex in kept:
        assert ex.query_type in PSEUDO_QUERY_TYPES and ex.query not in ex.pos[0]
    scope = stage_scope(config, store, "mine")
    run_encode(config, stage_scope(config, store, "encode"), show_progress=False)
    run_mine(config, scope, show_progress=False)
    mined = {ex.query_id: ex for ex in iter_examples(store.local_path("free/mine/train.jsonl"))}
    assert set(mined) == {ex.query_id for ex in kept}
    corpus = {json.loads(line)["_id"]: json.loads(line) for line in (tmp_path / "beir" / "corpus.jsonl").open()}
    for ex in kept:
        assert mined[ex.query_id].pos == ex.pos and mined[ex.query_id].pos_ids == ex.pos_ids
        assert ex.query not in mined[ex.query_id].pos[0]
        assert ex.query in (corpus[ex.pos_ids[0]]["title"] + " " + corpus[ex.pos_ids[0]]["text"])  # the corpus's has it
