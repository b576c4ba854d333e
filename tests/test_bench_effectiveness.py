"""bench/effectiveness.py on other collections: where its dev set comes from."""

from __future__ import annotations

import json

from bench.effectiveness import dev_set


def _collection(root, splits: dict[str, list[tuple[str, str]]]):
    root.mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"text {i}"}) + "\n"
                                               for i in range(4)))
    queries = {q for rows in splits.values() for q, _ in rows}
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": f"query {q}"}) + "\n" for q in sorted(queries)))
    (root / "qrels").mkdir()
    for split, rows in splits.items():
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in rows))
    return root


def test_the_collections_own_dev_split_comes_first(tmp_path):
    folder = _collection(tmp_path / "c", {"train": [("t1", "d0"), ("t2", "d1")], "dev": [("v1", "d2")],
                                          "test": [("x1", "d3")]})
    dev = dev_set(folder, size=1)
    assert dev.split == "dev" and set(dev.queries) == {"v1"} and dev.qrels == {"v1": {"d2": 1}}


def test_without_one_dev_is_carved_from_train_only(tmp_path):
    folder = _collection(tmp_path / "c", {"train": [("t1", "d0"), ("t2", "d1"), ("t3", "d2")], "test": [("x1", "d3")]})
    dev = dev_set(folder, size=2)
    assert len(dev.queries) == 2 and set(dev.queries) <= {"t1", "t2", "t3"}
    assert set(dev.qrels) == set(dev.queries)


def test_a_test_only_collection_has_no_dev(tmp_path):
    assert dev_set(_collection(tmp_path / "c", {"test": [("x1", "d3")]}), size=5) is None
