"""Every bad input gives exit code 2 and one line naming the file/line/key (or model), before any
work starts and without a partial artifact. One table; each row builds its input in a temp folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peg.cli import app

MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # packaged: resolves offline, never loaded by these rows


def write_beir(root: Path, corpus: bytes | None = None, qrels: str | None = None) -> Path:
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    rows = [{"_id": f"d{i}", "title": "", "text": f"passage {i}"} for i in range(4)]
    (beir / "corpus.jsonl").write_bytes(corpus or "".join(json.dumps(r) + "\n" for r in rows).encode())
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n" for i in range(2)))
    (beir / "qrels" / "test.tsv").write_text(qrels or "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\n")
    return beir


def write_pairs(path: Path, rows: int = 4, negatives: int = 2, scores: bool = True, nan: bool = False) -> Path:
    lines = []
    for i in range(rows):
        row = {"query": f"q {i}", "pos": [f"p {i}"], "neg": [f"n {i}-{j}" for j in range(negatives)]}
        if scores:
            row["pos_scores"] = [1.0]
            row["neg_scores"] = [float("nan") if nan else 0.5] * negatives
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(root: Path, text: str, store: str = "{uri: store}", model: str = MODEL) -> Path:
    path = root / "cfg.yaml"
    path.write_text(f"name: bad\nmodel: {{name_or_path: {model}}}\nstore: {store}\n{text}")
    return path


def train_args(root: Path, text: str) -> list[str]:
    return ["train", str(write_config(root, text)), "--output", str(root / "out")]


def bad_utf8_config(root: Path) -> list[str]:
    path = write_config(root, "")
    path.write_bytes(path.read_bytes() + b"train: {epochs: 1}  # caf\xe9\n")
    return ["config", "show", str(path)]


def bad_utf8_corpus(root: Path) -> list[str]:
    beir = write_beir(root, corpus=b'{"_id": "d0", "text": "ok"}\n{"_id": "d1", "text": "caf\xe9"}\n')
    return ["eval", "--model", MODEL, "--data", str(beir), "--output", str(root / "out")]


def bad_utf8_pairs(root: Path) -> list[str]:
    pairs = write_pairs(root / "pairs.jsonl")
    pairs.write_bytes(pairs.read_bytes() + b'{"query": "caf\xe9", "pos": ["x"]}\n')
    return train_args(root, "data: {train_files: [pairs.jsonl]}\nbatch: {queries_per_step: 2, hard_negatives: 2}\n")


def eval_output_is_a_file(root: Path) -> list[str]:
    (root / "taken").write_text("")
    return ["eval", "--model", MODEL, "--data", str(write_beir(root)), "--output", str(root / "taken")]


def conflicting_qrels(root: Path) -> list[str]:
    beir = write_beir(root, qrels="query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq0\td0\t0\n")
    return ["eval", "--model", MODEL, "--data", str(beir), "--output", str(root / "out")]


def empty_pairs_file(root: Path) -> list[str]:
    (root / "pairs.jsonl").write_text("")
    return train_args(root, "data: {train_files: [pairs.jsonl]}\n")


def listwise_without_scores(root: Path) -> list[str]:
    write_pairs(root / "pairs.jsonl", scores=False)
    return train_args(root, "data: {train_files: [pairs.jsonl]}\nloss: {kind: listwise}\n"
                            "batch: {queries_per_step: 2, hard_negatives: 2}\n")


def too_few_negatives(root: Path) -> list[str]:
    write_pairs(root / "pairs.jsonl", negatives=2)
    return train_args(root, "data: {train_files: [pairs.jsonl]}\nbatch: {queries_per_step: 2, hard_negatives: 3}\n")


def nan_teacher_score(root: Path) -> list[str]:
    write_pairs(root / "pairs.jsonl", nan=True)
    return train_args(root, "data: {train_files: [pairs.jsonl]}\nloss: {kind: listwise}\n"
                            "batch: {queries_per_step: 2, hard_negatives: 2}\n")


def config_show(text: str):
    return lambda root: ["config", "show", str(write_config(root, text))]


def with_data(command: str, model_keys: str = "", model: str = MODEL):
    """`peg <command> CONFIG` on a small BEIR folder (pipeline run, encode); `model_keys` are added
    to the model section."""
    def build(root: Path) -> list[str]:
        write_beir(root)
        return [*command.split(), str(write_config(root, "data: {beir: beir}\n", model=f"{model}{model_keys}"))]
    return build


def train_without_model(root: Path) -> list[str]:
    write_pairs(root / "pairs.jsonl")
    config = write_config(root, "data: {train_files: [pairs.jsonl]}\nbatch: {queries_per_step: 2, hard_negatives: 2}\n",
                          model="./no-model")
    return ["train", str(config), "--output", str(root / "out")]


def store_is_a_file(root: Path) -> list[str]:
    (root / "taken").write_text("")
    return ["pipeline", "run", str(write_config(root, "", "{uri: taken}"))]


def render_with(cluster_keys: str, command: str = "render"):
    """`peg render` (or another command) on an S3 config whose cluster section adds `cluster_keys`."""
    def build(root: Path) -> list[str]:
        store = f'{{uri: "s3://bucket/p", endpoint: "127.0.0.1:9"}}\ncluster: {{s3_secret: keys, {cluster_keys}}}'
        return [*command.split(), str(write_config(root, "", store))]
    return build


def closed_api_port(root: Path) -> list[str]:
    """A kubeconfig whose API server is 127.0.0.1:1 (nothing listens there)."""
    (root / "kubeconfig").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    os.environ["KUBECONFIG"] = str(root / "kubeconfig")  # the test restores the environment
    return ["submit", str(write_config(root, "", CLUSTER_STORE)), "--stage", "train", "--no-wait"]


def nan_teacher_score_at_prepare(root: Path) -> list[str]:
    write_pairs(root / "pairs.jsonl", nan=True)
    write_beir(root)
    return ["pipeline", "stage", "prepare", str(write_config(root, "data: {beir: beir, train_split: test, train_files: [pairs.jsonl]}\n"))]


def corpus_replaced(root: Path, change) -> list[str]:
    """`peg data check` on a BEIR folder whose corpus.jsonl `change(path)` replaced."""
    beir = write_beir(root)
    change(beir / "corpus.jsonl")
    return ["data", "check", str(beir)]


def long_run_name(root: Path) -> list[str]:
    path = write_config(root, "")
    path.write_text(path.read_text().replace("name: bad", f"name: {'a' * 300}"))
    return ["pipeline", "run", str(path)]


def symlink_loop_store(root: Path) -> list[str]:
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    return ["pipeline", "status", str(write_config(root, "", f"{{uri: {root / 'loop-a'}}}"))]


def lease_is_a_directory(command: str):
    def build(root: Path) -> list[str]:
        (root / "store" / "bad" / "_lease.json").mkdir(parents=True)
        return [*command.split(), str(write_config(root, ""))]
    return build


def self_referencing_alias(root: Path) -> list[str]:
    path = root / "cfg.yaml"
    path.write_text(f"name: bad\nmodel: &m {{name_or_path: {MODEL}, x: *m}}\n")
    return ["config", "show", str(path)]


def alias_bomb(root: Path) -> list[str]:
    """Nine levels of ten aliases each: 10^9 values from 11 lines."""
    lines = [f"name: bad\nmodel: {{name_or_path: {MODEL}}}", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = root / "cfg.yaml"
    path.write_text("\n".join([*lines, "train: {epochs: *a8}"]) + "\n")
    return ["config", "show", str(path)]


def s3_credentials_file(content: bytes | None):
    """`pipeline status` on an S3 store whose credentials file holds `content` (None: absent, while
    the environment holds keys)."""
    def build(root: Path) -> list[str]:
        if content is not None:
            (root / "keys.env").write_bytes(content)
        else:
            os.environ.update(AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret")  # the test restores them
        store = '{uri: "s3://bucket/p", endpoint: "127.0.0.1:9", secure: false, credentials_file: keys.env}'
        return ["pipeline", "status", str(write_config(root, "", store))]
    return build


CLUSTER_STORE = '{uri: "s3://bucket/p", endpoint: "127.0.0.1:9"}\ncluster: {s3_secret: keys}'  # renderable


def render_onto_a_file(root: Path) -> list[str]:
    (root / "out").write_text("mine\n")
    return ["render", str(write_config(root, "", CLUSTER_STORE)), "-o", str(root / "out")]


def garbage_kubeconfig(root: Path) -> list[str]:
    (root / "kubeconfig").write_text("clusters: [unclosed\n")
    os.environ["KUBECONFIG"] = str(root / "kubeconfig")  # the test restores the environment
    return ["submit", str(write_config(root, "", CLUSTER_STORE)), "--stage", "train", "--no-wait"]


# (id, build(root) -> CLI args, text the one line must contain, path under root that must not exist)
CASES = [
    ("utf8-config", bad_utf8_config, "cfg.yaml:4: invalid UTF-8 (byte 0xe9)", "store"),
    ("utf8-corpus", bad_utf8_corpus, "corpus.jsonl:2: invalid UTF-8", "out"),
    ("utf8-pairs", bad_utf8_pairs, "pairs.jsonl:5: not UTF-8 text", "out"),
    ("model-folder", lambda r: ["eval", "--model", "/no/such/dir", "--data", str(write_beir(r)), "--output", str(r / "out")],
     "model /no/such/dir: no such folder", "out"),
    ("hub-id-offline", lambda r: ["eval", "--model", "no-such-org/no-such-model", "--data", str(write_beir(r))],
     "model no-such-org/no-such-model: not a local folder", "out"),
    ("endpoint-port", lambda r: ["config", "show", str(write_config(r, "", '{uri: "s3://b/p", endpoint: "127.0.0.1:notaport"}'))],
     "cfg.yaml:3: store.endpoint '127.0.0.1:notaport': the port must be a number", "store"),
    ("eval-output-file", eval_output_is_a_file, "--output", "out"),
    ("schema-output", lambda r: ["config", "schema", "-o", str(r / "no" / "dir" / "x.json")], "x.json: cannot write", "no"),
    ("listwise-no-scores", listwise_without_scores, "pairs.jsonl:1: loss.kind=listwise needs teacher scores", "out"),
    ("too-few-negatives", too_few_negatives, "pairs.jsonl:1: 2 negatives, but batch.hard_negatives asks for 3", "out"),
    ("top-k-below-negatives", config_show("mining: {top_k: 3, negatives_per_query: 5}\n"),
     "cfg.yaml:4: mining.top_k (3) is below mining.negatives_per_query (5)", "store"),
    ("top-k-below-hard-negatives", config_show("data: {beir: x}\nmining: {top_k: 4, negatives_per_query: 4}\n"
                                               "batch: {hard_negatives: 6}\n"),
     "cfg.yaml:6: batch.hard_negatives (6) exceeds mining.negatives_per_query (4)", "store"),
    ("listwise-without-score-stage", config_show("data: {beir: x}\nloss: {kind: listwise}\n"),
     "cfg.yaml:5: loss.kind listwise needs teacher scores: set score.enabled", "store"),
    ("score-list-too-short", config_show("data: {beir: x}\nbatch: {hard_negatives: 5}\nscore: {enabled: true, list_size: 4}\n"),
     "cfg.yaml:6: score.list_size (4) is below batch.hard_negatives + 1 (6)", "store"),
    ("duplicate-yaml-key", config_show("train:\n  epochs: 1\n  epochs: 2\n"),
     "cfg.yaml:6: train.epochs: duplicate key (first on line 5)", "store"),
    ("grad-clip-inf", config_show("train: {grad_clip: .inf}\n"), "cfg.yaml:4: train.grad_clip", "store"),
    ("conflicting-qrels", conflicting_qrels, "test.tsv:4: (q0, d0) has relevance 0 here and 1 on line 2", "out"),
    ("nan-teacher-score", nan_teacher_score, "pairs.jsonl:1: field 'neg_scores' holds a non-finite value", "out"),
    ("empty-pairs-file", empty_pairs_file, "data.train_files[0]", "out"),
    # checks before any stage starts: named at once, not as "stage encode failed (exit code 1)"
    ("max-length-above-positions", with_data("pipeline run", ", passage_max_length: 1000"),
     "cfg.yaml:2: model.passage_max_length (1000) exceeds the 512 positions of model", "store"),
    ("max-length-above-positions-encode", with_data("encode", ", query_max_length: 600"),
     "model.query_max_length (600) exceeds the 512 positions", "store"),
    ("model-folder-pipeline", with_data("pipeline run", model="./no-model"), "no-model: no such folder", "store"),
    ("model-folder-encode", with_data("encode", model="./no-model"), "no-model: no such folder", "store"),
    ("model-folder-train", train_without_model, "no-model: no such folder", "out"),
    ("hub-id-pipeline", with_data("pipeline run", model="no-such-org/no-such-model"),
     "model no-such-org/no-such-model: not a local folder", "store"),
    ("run-name-300", long_run_name, "cfg.yaml:1: name: 300 characters; a run name has at most 63", "store"),
    ("store-symlink-loop", symlink_loop_store, "loop-a: symbolic links loop", "store"),
    ("lease-is-a-directory-status", lease_is_a_directory("pipeline status"), "_lease.json: cannot read (Is a directory)", "x"),
    ("lease-is-a-directory-run", lease_is_a_directory("pipeline run"), "_lease.json: cannot read (Is a directory)", "store/bad/prepare"),
    # each of these printed a traceback
    ("yaml-alias-loop", self_referencing_alias, "cfg.yaml:2: a YAML alias refers to a node that contains it", "store"),
    ("yaml-alias-bomb", alias_bomb, "cfg.yaml: expands to more than 100,000 values", "store"),
    ("credentials-not-utf8", s3_credentials_file(b"AWS_ACCESS_KEY_ID=caf\xe9\nAWS_SECRET_ACCESS_KEY=x\n"),
     "keys.env:1: invalid UTF-8", "store"),
    ("credentials-file-missing", s3_credentials_file(None), "keys.env: no such file or directory", "store"),
    ("render-onto-a-file", render_onto_a_file, "--output", "x"),
    ("kubeconfig-garbage", garbage_kubeconfig, "/kubeconfig:2: invalid YAML", "store"),
    # what the API server would refuse, refused by `peg render` and `peg operator manifest`
    ("render-quantity", render_with("resources: {cpu: four, memory: 16Gi}"),
     "cluster.resources.cpu: 'four' is not a Kubernetes quantity", "x"),
    ("render-node-selector-key", render_with("node_selector: {'bad key!': v}"),
     "cluster.node_selector: 'bad key!': a label name has at most 63 characters", "x"),
    ("render-image", render_with("image: 'Registry.io/Team/Peg:1'"),
     "cluster.image: 'Registry.io/Team/Peg:1' is not an image reference", "x"),
    ("render-secret-name", render_with("service_account: Peg_Runner"),
     "cluster.service_account: 'Peg_Runner' is not a DNS-1123 subdomain", "x"),
    ("render-pull-secret-name", render_with("image_pull_secrets: [Regcred_1]"),
     "cluster.image_pull_secrets[0]: 'Regcred_1' is not a DNS-1123 subdomain", "x"),
    ("render-scratch-size", render_with("scratch_size: 2Gx"), "cluster.scratch_size: '2Gx' is not a Kubernetes quantity", "x"),
    ("render-kueue-queue", render_with("queue: 'team queue'"), "cluster.queue: 'team queue': a label value", "x"),
    ("render-every-problem-on-one-line", render_with("resources: {cpu: four, memory: lots}"),
     "cluster.resources.cpu: 'four' is not a Kubernetes quantity (e.g. '4', '500m', '16Gi'); "
     "cluster.resources.memory: 'lots' is not", "x"),
    ("render-inline-secret", render_with("env: {HTTPS_PROXY: 'http://user:hunter2@proxy:3128'}"),
     "cluster.env.HTTPS_PROXY: holds a URI with user:password@; a value written into the run's ConfigMap", "x"),
    ("operator-manifest-checks-as-render", render_with("resources: {cpu: '4', memory: lots}", "operator manifest"),
     "cluster.resources.memory: 'lots' is not a Kubernetes quantity", "x"),
    ("api-server-port-closed", closed_api_port, "Kubernetes API https://127.0.0.1:1: cannot connect", "store"),
    # a corpus that is not a file gets its own reason
    ("corpus-is-a-directory", lambda r: corpus_replaced(r, lambda c: (c.unlink(), c.mkdir())),
     "corpus.jsonl: is a directory, not a file", "x"),
    ("corpus-only-gzipped", lambda r: corpus_replaced(r, lambda c: c.rename(c.with_name("corpus.jsonl.gz"))),
     "corpus.jsonl: file not found (there is corpus.jsonl.gz: decompress it first)", "x"),
    ("corpus-symlink-loop", lambda r: corpus_replaced(r, lambda c: (c.unlink(), c.symlink_to(c))),
     "corpus.jsonl: symbolic links loop", "x"),
    ("nan-teacher-score-at-prepare", nan_teacher_score_at_prepare,
     "pairs.jsonl:1: field 'neg_scores' holds a non-finite value", "store/bad/prepare/data"),
    # a store that cannot be used: said before any work, without "rerun to resume" (no rerun helps)
    ("store-is-a-file", store_is_a_file, "/taken: not a directory", "store"),
    ("store-scheme", lambda r: ["pipeline", "run", str(write_config(r, "", '{uri: "ftp://host/p"}'))],
     "store.uri 'ftp://host/p': unsupported scheme", "store"),
    ("store-endpoint-missing", lambda r: ["pipeline", "run", str(write_config(r, "", '{uri: "s3://bucket/p"}'))],
     "store.endpoint is required for s3://bucket/p", "store"),
    # nonsense values, refused at load with the key
    ("boolean-for-a-count", config_show("train: {epochs: yes}\n"), "cfg.yaml:4: train.epochs: True is a boolean", "store"),
    ("count-beyond-any-run", config_show("batch: {queries_per_step: 99999999999}\n"),
     "cfg.yaml:4: batch.queries_per_step: 99999999999: beyond any real run", "store"),
    ("credentials-in-the-uri", lambda r: ["config", "show", str(write_config(
        r, "", '{uri: "s3://AKIAEXAMPLE:secret@bucket/p", endpoint: "127.0.0.1:9"}'))],
     "cfg.yaml:3: store.uri: holds credentials", "store"),
    ("lease-of-a-year", lambda r: ["config", "show", str(write_config(r, "", "{uri: store, lease_seconds: 31536000}"))],
     "cfg.yaml:3: store.lease_seconds: 3.1536e+07 s: a lease lasts at most 86400 s", "store"),
]


@pytest.mark.parametrize(("build", "expected", "absent"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line_and_exit_2(tmp_path, monkeypatch, build, expected, absent):
    for name in ("KUBECONFIG", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # rows may set them: restored after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PEG_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, build(tmp_path))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0], lines[0]
    assert "rerun" not in lines[0] or "rerun with -v" in lines[0], lines[0]  # a rerun would meet the same input
    assert not (tmp_path / absent).exists()


def test_bom_at_the_start_of_jsonl_and_qrels_is_accepted(tmp_path):
    from peg.data import BeirDataset

    beir = write_beir(tmp_path)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (beir / name).write_bytes(b"\xef\xbb\xbf" + (beir / name).read_bytes())
    data = BeirDataset.load(beir, "test")
    assert sorted(data.corpus) == ["d0", "d1", "d2", "d3"] and data.qrels == {"q0": {"d0": 1}, "q1": {"d1": 1}}


@pytest.mark.slow
def test_a_huge_passage_is_cut_before_tokenisation_to_the_tokens_the_model_reads(tmp_path):
    """A 2 MB passage: the tokenizer sees only a max_length-bounded prefix, and the ids are those of
    the whole text truncated (what the model would have read anyway)."""
    from tiny import make_tiny_model

    from peg.config import ModelConfig
    from peg.model import Encoder

    encoder = Encoder(ModelConfig(name_or_path=str(make_tiny_model(tmp_path / "m")), passage_max_length=48))
    seen = []
    tokenizer = encoder.tokenizer
    encoder.tokenizer = lambda texts, **kwargs: seen.extend(len(t) for t in texts) or tokenizer(texts, **kwargs)
    huge = " ".join(f"word{i % 997} piece" for i in range(150_000))
    features = encoder.tokenize([huge, "a short one"], "passage", padding=False)
    assert max(seen) <= 48 * 32 and seen[1] == len("a short one")
    whole = tokenizer([huge[:100_000]], truncation=True, max_length=48)["input_ids"][0]
    assert features["input_ids"][0] == whole and len(whole) == 48
    encoder.tokenizer = tokenizer
    assert encoder.encode([huge], "passage").shape == (1, 32)


def test_data_check_names_an_empty_passage_as_empty_not_as_missing(tmp_path):
    corpus = b'{"_id": "d0", "title": "", "text": "passage 0"}\n{"_id": "d1", "title": "", "text": ""}\n'
    beir = write_beir(tmp_path, corpus=corpus)
    result = CliRunner().invoke(app, ["data", "check", str(beir)])
    problems = [line for line in result.output.splitlines() if line.startswith("problem:")]
    assert result.exit_code == 1
    assert problems == [f"problem: {beir / 'corpus.jsonl'}:2: passage 'd1' is empty (no title, no text)"]
