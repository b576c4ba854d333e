"""Effectiveness ablations on a BEIR collection's test split (nDCG@10, Recall@100): one script,
same step budget and seeds for every arm.

`--collection DIR` (default SciFact) is any BEIR folder, e.g. one built by bench/data/assemble.py
(NFCorpus, NQ-UTD). Its dev set: the collection's own `qrels/dev.tsv` where it has one (NFCorpus),
else `--dev-queries` carved from its TRAIN queries (SciFact), else none (NQ-UTD: nothing can be
chosen there, and the arms that train on human queries cannot run).

Arms (`--arms`, default all):
    base                         the packaged all-MiniLM-L6-v2, no training
    infonce-human                InfoNCE on SciFact's human train queries (mined hard negatives)
    progressive-human            PEG progressive InfoNCE on the same data
    progressive-to-uniform-human the same, with a schedule that ends at uniform (beta_end 0: the hardest
                                 negatives damped early, weighted as in InfoNCE at the end; the pace
                                 reaches 1, so every query weighs 1 at the end too)
    infonce-synthetic            InfoNCE on round-trip-filtered synthetic queries (no human data)
    listwise-synthetic           listwise distillation on the synthetic queries (teacher scores)
    listwise-synthetic+human     listwise on synthetic + as many sampled human queries (both teacher-scored)
    listwise-question            listwise on the synthetic `question` queries alone (vs all types mixed)
    pretrain+listwise-synthetic  PEG masked auto-encoding on the corpus, then listwise-synthetic
    corpus-recipe                `--recipe` (default examples/scifact-corpus-fast.yaml) run unchanged by
                                 `peg pipeline run` (every stage: synth, mine, score, train, eval), only
                                 data.beir, store, name and the seed (synth.seed = train.seed = seed) set
                                 here; its wall time is recorded; never tuned on dev
Every trained arm runs `--steps` optimizer steps of `--queries-per-step` queries x (1 +
`--hard-negatives`) passages for each seed in `--seeds`; results are mean +- sd over seeds.
Every run is evaluated on the test split and on the dev set (above). Settings are the quickstart's and Tamber et al.'s, except that
`--select-lr LR ...` (and, for the listwise arms, `--select-teacher-temperature T ...`, the
KL term's T_t) chooses the settings of the corpus-only arms (`--select-arms`) by dev nDCG@10 at
`--select-seed`, over the grid of both, then runs `--seeds` at the chosen setting. Arms that train on human
train queries are never selected on dev (the dev queries are among their training data), and the
test split chooses nothing.

`--positive-reference highest` mines with `mining.positive_reference: highest` (the margin rule's
threshold from a query's best positive: for collections with many weakly judged positives, e.g.
NFCorpus); its runs are kept apart, under `.../positive-highest/`.

Everything is built with peg's own stages and cached in `--store` (shared with
bench/teacher_quality.py): corpus embeddings (encode cache), synthetic queries (synth), mined
lists (mine), teacher scores (score), the pretrained model; each arm's trained model and its
eval are kept under `<store>/effectiveness/`, so a rerun redoes only what is missing. Results are
written after every arm: `--out`.json / .md / .png (default bench/results/effectiveness[-<collection>]), and, when a
progressive-human run's training log is on disk, `--out`-progressive.png: the schedule that run
logged (beta(t), pace, query weights) next to each seed's nDCG@10, uniform vs progressive.
`--synthetic-from RUN` takes the synthetic mined and scored lists of a finished corpus-only run
instead of running synth and score again; `--cached-only` trains nothing and writes the outputs
from the arms already run.

On 2 CPU cores only the smallest settings fit (each trained arm re-encodes the 5,183-passage
corpus, minutes per arm); on a GPU machine run it in full, e.g.

    PEG_SCIFACT=../shared/data/scifact python bench/effectiveness.py --synth-passages 1000 \\
        --steps 200 --seeds 0 1 2 --list-size 20 --teacher cross_encoder --cross-encoder PATH \\
        --select-lr 2e-5 5e-5 1e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import statistics
import time
from pathlib import Path

from bench.scifact import DEFAULT_STORE, MINILM, ROOT, SCIFACT, bench_config, dev_split, embed_split
from peg.config import ListwiseConfig, RunConfig, load_config
from peg.data import BeirDataset, iter_examples, write_examples
from peg.eval import evaluate_embeddings
from peg.store import open_store

ARMS: dict[str, dict] = {
    "base": {},
    "infonce-human": {"data": "human", "loss": "infonce"},
    "progressive-human": {"data": "human", "loss": "progressive"},
    "progressive-to-uniform-human": {"data": "human", "loss": "progressive", "progressive": {"beta_end": 0.0}},
    "infonce-synthetic": {"data": "synthetic", "loss": "infonce"},
    "listwise-synthetic": {"data": "synthetic", "loss": "listwise"},
    "listwise-synthetic+human": {"data": "both", "loss": "listwise"},
    "listwise-question": {"data": "synthetic", "loss": "listwise", "types": ["question"]},
    "pretrain+listwise-synthetic": {"data": "synthetic", "loss": "listwise", "pretrain": True},
    "corpus-recipe": {"data": "synthetic", "recipe": True},
}
CORPUS_ONLY = [name for name, arm in ARMS.items() if arm.get("data") == "synthetic" and not arm.get("recipe")]
HUMAN = [name for name, arm in ARMS.items() if arm.get("data") in ("human", "both")]
RECIPE = ROOT / "examples" / "scifact-corpus-fast.yaml"
TEACHER_TEMPERATURE = ListwiseConfig().teacher_temperature


@dataclasses.dataclass(frozen=True, order=True)
class Knobs:
    """The settings a run is chosen by on dev: learning rate and (listwise arms only) the
    teacher temperature T_t of the KL term."""

    lr: float
    teacher_temperature: float = TEACHER_TEMPERATURE

    def for_arm(self, name: str) -> Knobs:
        """These knobs as they apply to `name`: T_t only exists for the listwise arms."""
        return self if ARMS[name].get("loss") == "listwise" else dataclasses.replace(self, teacher_temperature=TEACHER_TEMPERATURE)

    @property
    def label(self) -> str:
        tt = "" if self.teacher_temperature == TEACHER_TEMPERATURE else f", T_t {self.teacher_temperature:g}"
        return f"{self.lr:g}{tt}"

    @property
    def suffix(self) -> str:
        tt = "" if self.teacher_temperature == TEACHER_TEMPERATURE else f"-tt{self.teacher_temperature:g}"
        return f"lr{self.lr:g}{tt}"


def dev_set(collection: Path, size: int) -> BeirDataset | None:
    """Where settings are chosen: the collection's own dev qrels, else `size` seeded TRAIN queries
    (their qrels as the dev split's), else None (a collection with neither, e.g. NQ-UTD)."""
    qrels = collection / "qrels"
    if (qrels / "dev.tsv").is_file():
        return BeirDataset.load(collection, "dev")
    if not (qrels / "train.tsv").is_file():
        return None
    train = BeirDataset.load(collection, "train")
    dev_ids = dev_split(train, size)
    return dataclasses.replace(train, split="dev", queries={q: train.queries[q] for q in dev_ids},
                               qrels={q: train.qrels[q] for q in dev_ids})


class Bench:
    """Builds the shared training files once (through peg's stages) and runs/evaluates arms."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.collection = Path(args.collection).resolve()
        self.name = self.collection.name
        # SciFact's runs stay where they were before other collections existed
        self.root = Path(args.store) / "effectiveness" / ("" if self.collection == SCIFACT.resolve() else self.name)
        if args.positive_reference != "lowest":  # other mined lists, other trained models: never mixed with these
            self.root = self.root / f"positive-{args.positive_reference}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = open_store(self.bench_config().store)
        self.test = BeirDataset.load(self.collection, "test")
        self.dev = dev_set(self.collection, args.dev_queries)

    def bench_config(self, **kwargs) -> RunConfig:
        return bench_config(self.args.store, beir=self.collection, **kwargs)

    @property
    def has_train(self) -> bool:
        return (self.collection / "qrels" / "train.tsv").is_file()

    def config(self, **sections) -> RunConfig:
        a = self.args
        llm = {"mode": "query_likelihood", "batch_size": 8, "max_passage_chars": a.max_passage_chars,
               "shard_size": 16, "num_actors": 1, "actor_cpus": 1.0}
        base = {
            "synth": {"enabled": True, "num_passages": a.synth_passages, "filter_top_k": a.filter_top_k,
                      "llm": {**llm, "shard_size": 5}},
            "score": {"enabled": True, "teacher": a.teacher, "biencoder_weight": a.biencoder_weight,
                      "cross_encoder_path": a.cross_encoder, "list_size": a.list_size, "llm": llm},
            "mining": {"num_shards": 1, "top_k": 30, "negatives_per_query": a.list_size - 1, "actor_cpus": 0.5,
                       "positive_reference": a.positive_reference},
            "batch": {"queries_per_step": a.queries_per_step, "hard_negatives": a.hard_negatives, "chunk_size": 32},
            "train": {"max_steps": a.steps, "learning_rate": a.learning_rate, "warmup_ratio": 0.1,
                      "nproc_per_node": a.nproc, "zero_stage": 2},
        }
        for name, values in sections.items():
            base[name] = {**base.get(name, {}), **values}
        return self.bench_config(**base)

    def _data_file(self, name: str) -> Path:
        return self.root / "data" / f"{name}.jsonl"

    def run_name(self, name: str, seed: int, knobs: Knobs) -> str:
        if ARMS[name].get("recipe"):  # no knobs of the bench's apply; each recipe its own results
            return f"{name}-{Path(self.args.recipe).stem}-seed{seed}"
        return f"{name}-seed{seed}" if name == "base" else f"{name}-{knobs.for_arm(name).suffix}-seed{seed}"

    def _result_file(self, name: str, seed: int, knobs: Knobs) -> Path:
        return self.root / "runs" / f"{self.run_name(name, seed, knobs)}.json"

    def _stage_file(self, name: str, build) -> Path:
        path = self._data_file(name)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key = build()
            shutil.copyfile(self.store.local_path(key), path)
        return path

    def adopt_synthetic(self, run_dir: Path) -> None:
        """Take the synthetic lists of a finished corpus-only run (`peg pipeline run
        examples/scifact-synthetic.yaml`): its mined `mine/train.jsonl` and teacher-scored
        `score/train.jsonl`, instead of synthesising and scoring again (the LLM stages are most of
        an hour on 2 CPU cores). Both stages must be complete by their stage record, and the
        files taken must be the ones the record names (sha256)."""
        from peg.pipeline.state import read_record

        store = open_store(bench_config(str(run_dir.parent), beir=self.collection).store)
        for stage, name in (("mine", "mined-synthetic"), ("score", f"scored-synthetic-{self.args.teacher}")):
            key = f"{run_dir.name}/{stage}/train.jsonl"
            record = read_record(store, f"{run_dir.name}/{stage}")
            if record is None or record.status != "complete":
                raise SystemExit(f"{run_dir / stage}: stage not complete ({record.status if record else 'no record'}); "
                                 "finish that run first")
            if store.verify(key).sha256 != record.outputs.get(key):
                raise SystemExit(f"{run_dir / stage / 'train.jsonl'}: not the file its stage record names")
            path = self._data_file(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(store.local_path(key), path)

    def mined(self, source: str) -> Path:
        """Mined lists for `source` (human / synthetic) via the synth and mine stages."""
        from peg.llm import run_synth
        from peg.mine import run_mine
        from peg.pipeline.runner import stage_scope

        def build() -> str:
            config = self.config(data={"train_queries": source})
            if source != "human":
                run_synth(config, stage_scope(config, self.store, "synth"))
            return run_mine(config, stage_scope(config, self.store, "mine")).keys["train"]

        return self._stage_file(f"mined-{source}", build)

    def human_sample(self) -> Path:
        """A seeded sample of the mined human lists, as many as there are scored synthetic lists
        (teacher-scoring all 809 human queries is an hour of LLM time on 2 CPU cores; the step
        budget reads fewer queries than either set holds)."""
        n = sum(1 for _ in iter_examples(self.scored("synthetic")))
        path = self._data_file(f"mined-human-sample{n}")
        if not path.exists():
            examples = list(iter_examples(self.mined("human")))
            write_examples(path, random.Random(0).sample(examples, min(n, len(examples))))
        return path

    def scored(self, source: str) -> Path:
        """Teacher-scored lists via the score stage: `synthetic` (all), `human` (human_sample), or
        `both` (the two files together)."""
        from peg.llm import run_score
        from peg.pipeline.runner import stage_scope

        if source == "both":
            path = self._data_file(f"scored-both-{self.args.teacher}")
            if not path.exists():
                parts = [self.scored("synthetic"), self.scored("human")]
                write_examples(path, (ex for part in parts for ex in iter_examples(part)))
            return path

        def build() -> str:
            mined = self.human_sample() if source == "human" else self.mined(source)
            config = self.config(data={"train_queries": source})
            scope = stage_scope(config, self.store, "score", {"mine": mined.stem})  # a changed input: new shards
            self.store.put_file(scope.key_of("mine", "train.jsonl"), mined, producer="bench", config_hash=source)
            run_score(config, scope)  # reads mine/train.jsonl (the bench's config has no judge)
            return scope.key("train.jsonl")

        return self._stage_file(f"scored-{source}-{self.args.teacher}", build)

    def of_types(self, path: Path, types: list[str]) -> Path:
        out = path.with_name(f"{path.stem}-{'-'.join(types)}.jsonl")
        if not out.exists():
            write_examples(out, (ex for ex in iter_examples(path) if ex.query_id.rsplit("-", 1)[-1] in types))
        return out

    def pretrained(self) -> str:
        from peg.train.pretrain import pretrain

        out = self.root / "pretrain"
        if not (out / "model" / "config.json").exists():
            a = self.args
            config = self.config(pretrain={"enabled": True, "batch_size": 32, "max_steps": a.pretrain_steps,
                                           "max_length": 256, "learning_rate": 5e-5})
            pretrain(config, out, resume=(out / "checkpoints" / "latest").exists())
        return str(out / "model")

    def train_file(self, arm: dict) -> Path:
        if arm["loss"] == "listwise":
            path = self.scored(arm["data"])
        else:
            path = self.mined(arm["data"])
        return self.of_types(path, arm["types"]) if "types" in arm else path

    def recipe(self, seed: int) -> tuple[str, float]:
        """Run `--recipe` on this collection unchanged but for data.beir, store, name and the seed
        (`peg pipeline run`, resumable: completed stages are skipped); return (exported model folder,
        wall seconds of this call). The derived config is kept beside the run's store."""
        import subprocess
        import sys

        import yaml

        from peg.pipeline.results import EXPORTED_MODEL, result_key

        source = Path(self.args.recipe).resolve()
        raw = yaml.safe_load(source.read_text())
        raw["name"] = f"{self.name}-{source.stem}-seed{seed}"
        raw["data"]["beir"] = str(self.collection)
        raw["store"] = {**raw.get("store", {}), "uri": str(self.root / "recipe" / "store")}
        raw.setdefault("synth", {})["seed"] = seed
        raw.setdefault("train", {})["seed"] = seed
        path = self.root / "recipe" / f"{source.stem}-seed{seed}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "peg", "pipeline", "run", str(path)])
        if done.returncode != 0:
            raise SystemExit(f"{path}: peg pipeline run failed (exit {done.returncode})")
        store = open_store(load_config(path).store)
        model = store.local_path(result_key(raw["name"], EXPORTED_MODEL))
        if model is None or not (model / "config.json").is_file():
            raise SystemExit(f"{path}: peg pipeline run exited 0 but exported no model at {model}")
        return str(model), time.monotonic() - started

    def cached(self, name: str, seed: int, knobs: Knobs) -> dict | None:
        done = self._result_file(name, seed, knobs)
        return json.loads(done.read_text()) if done.exists() else None

    def _evaluate(self, model: str, data: BeirDataset, prefix: str = "") -> dict[str, float]:
        q_ids, q_emb, p_ids, p_emb = embed_split(self.bench_config(model=model), data)
        metrics = evaluate_embeddings(q_ids, q_emb, p_ids, p_emb, data.qrels).metrics
        return {f"{prefix}ndcg@10": metrics["ndcg@10"], f"{prefix}recall@100": metrics["recall@100"]}

    def train_log(self, name: str, seed: int, knobs: Knobs) -> list[dict]:
        """The trainer's metrics.jsonl records of one finished run (empty if its folder is gone or
        it has not exported its model yet)."""
        output = self.root / "train" / self.run_name(name, seed, knobs)
        if not (output / "model" / "config.json").exists():
            return []
        return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def run_arm(self, name: str, seed: int, knobs: Knobs) -> dict:
        """Train (unless base) and evaluate one arm, seed and knobs on test and dev; cached
        in <store>/effectiveness/runs. A result from before dev was measured gains its dev metrics
        when its model is still on disk (a finished training exported `model/`, atomically)."""
        from peg.train import train

        arm = ARMS[name]
        knobs = knobs.for_arm(name)
        output = self.root / "train" / self.run_name(name, seed, knobs)
        model = str(output / "model") if arm else MINILM
        trained = (output / "model" / "config.json").exists()
        result = self.cached(name, seed, knobs)
        unsaved = result is None
        wall = {}
        if result is None and arm.get("recipe"):
            model, seconds = self.recipe(seed)
            trained, wall = True, {"wall_s": round(seconds)}
        elif result is None:
            if arm and not trained:
                loss = {"kind": "listwise" if arm["loss"] == "listwise" else "infonce",
                        "progressive": {"enabled": arm["loss"] == "progressive", **arm.get("progressive", {})},
                        "listwise": {"teacher_temperature": knobs.teacher_temperature}}
                config = self.config(loss=loss, data={"train_files": [str(self.train_file(arm))]},
                                     train={"seed": seed, "learning_rate": knobs.lr})
                if arm.get("pretrain"):
                    config.model.name_or_path = self.pretrained()
                model = str(train(config, output, resume=(output / "checkpoints" / "latest").exists()))
                trained = True
        if result is None:
            result = {"arm": name, "seed": seed, "learning_rate": None if not arm or arm.get("recipe") else knobs.lr, **wall,
                      **({"teacher_temperature": knobs.teacher_temperature} if arm.get("loss") == "listwise" else {}),
                      **self._evaluate(model, self.test)}
        if self.dev is not None and "dev_ndcg@10" not in result and (not arm or trained):
            result.update(self._evaluate(model, self.dev, prefix="dev_"))
            unsaved = True
        if unsaved:
            done = self._result_file(name, seed, knobs)
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(result) + "\n")
        return result


def knobs_of(result: dict) -> Knobs:
    return Knobs(result["learning_rate"], result.get("teacher_temperature", TEACHER_TEMPERATURE))


def summarise(results: list[dict]) -> dict[str, dict]:
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        rows = [r for r in results if r["arm"] == arm]
        entry = {"seeds": [r["seed"] for r in rows], "learning_rate": rows[0].get("learning_rate"),
                 "setting": None if rows[0].get("learning_rate") is None else knobs_of(rows[0]).label}
        for metric in ("ndcg@10", "recall@100", "dev_ndcg@10"):
            values = [r[metric] for r in rows if metric in r]
            entry[metric] = statistics.fmean(values) if values else None
            entry[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else None
            entry[f"{metric}_n"] = len(values)
        walls = [r["wall_s"] for r in rows if "wall_s" in r]
        entry["wall_s"] = statistics.fmean(walls) if walls else None
        out[arm] = entry
    return out


def write_outputs(out: Path, settings: dict, results: list[dict], selection: dict[str, dict], test: BeirDataset,
                  dev: BeirDataset | None) -> None:
    summary = summarise(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "summary": summary, "selection": selection,
                                                    "runs": results}, indent=2) + "\n")
    fmt = lambda v, sd: "-" if v is None else f"{v:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")  # noqa: E731
    collection = Path(settings["collection"]).name
    if dev is None:
        dev_note = "dev: none (the collection has no train or dev split); nothing was chosen on it."
    elif (ROOT / settings["collection"] / "qrels" / "dev.tsv").is_file():
        dev_note = f"dev: the collection's dev split ({len(dev.queries)} queries), disjoint from its train queries."
    else:
        dev_note = (f"dev: {settings['dev_queries']} TRAIN queries (seeded); human arms train on them, so their dev "
                    "figure is not held out.")
    lines = [f"# Effectiveness on {collection} test ({len(test.queries)} queries)", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             dev_note + " (n) after a dev figure: measured on n of the seeds (runs from before dev was measured "
             "whose models were no longer on disk have none). wall: mean seconds of the recipe's `peg pipeline run` "
             "(as the bench ran it; a resumed run counts only what was left).", "",
             "setting: learning rate, and the listwise teacher temperature T_t where it is not "
             f"{TEACHER_TEMPERATURE:g}.", "",
             "| arm | setting | seeds | nDCG@10 | Recall@100 | dev nDCG@10 | wall |", "|---|---|---|---:|---:|---:|---:|"]
    for arm, e in summary.items():
        setting = e["setting"] or "-"
        dev = fmt(e["dev_ndcg@10"], e["dev_ndcg@10_sd"])
        if 0 < e["dev_ndcg@10_n"] < len(e["seeds"]):
            dev += f" ({e['dev_ndcg@10_n']})"
        wall = "-" if e["wall_s"] is None else f"{e['wall_s']:.0f} s"
        lines.append(f"| {arm} | {setting} | {len(e['seeds'])} | {fmt(e['ndcg@10'], e['ndcg@10_sd'])} | "
                     f"{fmt(e['recall@100'], e['recall@100_sd'])} | {dev} | {wall} |")
    if selection:
        lines += ["", "## Settings chosen on dev", "",
                  "Each candidate trained once (seed shown); the setting with the best dev nDCG@10 is chosen; the "
                  "test column is shown, not used.", "",
                  "| arm | seed | setting | dev nDCG@10 | test nDCG@10 | chosen |", "|---|---|---|---:|---:|---|"]
        for arm, sel in selection.items():
            for label, r in sel["candidates"].items():
                mark = "yes" if label == sel["chosen"] else ""
                lines.append(f"| {arm} | {sel['seed']} | {label} | {r['dev_ndcg@10']:.4f} | {r['ndcg@10']:.4f} | {mark} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(summary)), 3.5))
    names = list(summary)
    values = [summary[n]["ndcg@10"] for n in names]
    errors = [summary[n]["ndcg@10_sd"] or 0 for n in names]
    bars = ax.bar(range(len(names)), values, yerr=errors, capsize=3)
    ax.bar_label(bars, fmt="%.4f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(min(values) - 0.05, max(values) + 0.03)
    ax.set_ylabel(f"nDCG@10 ({collection} test)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    plt.close(fig)


def write_progressive(path: Path, results: list[dict], log: list[dict], collection: str) -> bool:
    """Progressive vs uniform InfoNCE (same data, budget, seeds): the schedule one progressive run
    logged (beta(t), pace, query weights) next to each seed's test nDCG@10 of both arms."""
    by_arm = {arm: {r["seed"]: r["ndcg@10"] for r in results if r["arm"] == arm}
              for arm in ("infonce-human", "progressive-human")}
    seeds = sorted(set(by_arm["infonce-human"]) & set(by_arm["progressive-human"]))
    if not seeds or not any("beta" in r for r in log):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peg.pipeline.report import draw_progressive

    fig, (schedule, weights, evaluation) = plt.subplots(1, 3, figsize=(12, 3.4))
    draw_progressive(log, schedule, weights)
    for arm, label in (("infonce-human", "uniform"), ("progressive-human", "progressive")):
        values = [by_arm[arm][s] for s in seeds]
        evaluation.plot(seeds, values, "o-", label=f"{label} (mean {statistics.fmean(values):.4f})")
    evaluation.set_xticks(seeds, [f"seed {s}" for s in seeds])
    evaluation.set_ylabel(f"nDCG@10 ({collection} test)")
    evaluation.set_title("eval: uniform vs progressive InfoNCE")
    evaluation.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collection", type=Path, default=SCIFACT,
                        help="BEIR folder (default SciFact); e.g. bench/data/nfcorpus from bench/data/assemble.py.")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="The corpus-recipe arm's run config.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--queries-per-step", type=int, default=16)
    parser.add_argument("--hard-negatives", type=int, default=7)
    parser.add_argument("--list-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-5, help="Of every arm not selected on dev.")
    parser.add_argument("--dev-queries", type=int, default=100, help="Seeded subset of the train queries (dev).")
    parser.add_argument("--select-lr", nargs="+", type=float, default=[],
                        help="Candidate learning rates for --select-arms, chosen by dev nDCG@10.")
    parser.add_argument("--teacher-temperature", type=float, default=TEACHER_TEMPERATURE,
                        help="T_t of the listwise arms' KL term, where not selected on dev.")
    parser.add_argument("--select-teacher-temperature", nargs="+", type=float, default=[],
                        help="Candidate T_t for the listwise --select-arms, chosen by dev nDCG@10 with --select-lr.")
    parser.add_argument("--select-arms", nargs="+", default=CORPUS_ONLY, choices=CORPUS_ONLY,
                        help="Arms whose settings --select-lr / --select-teacher-temperature choose (corpus-only arms: "
                             "dev is held out from them).")
    parser.add_argument("--select-seed", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--synth-passages", type=int, default=40)
    parser.add_argument("--filter-top-k", type=int, default=5)
    parser.add_argument("--teacher", default="llm_biencoder", choices=["llm", "llm_biencoder", "cross_encoder"])
    parser.add_argument("--biencoder-weight", type=float, default=0.4)
    parser.add_argument("--cross-encoder", default=None, help="Local reranker folder (teacher cross_encoder).")
    parser.add_argument("--max-passage-chars", type=int, default=1200)
    parser.add_argument("--positive-reference", default="lowest", choices=["lowest", "highest"],
                        help="mining.positive_reference (highest: for many weakly judged positives, e.g. NFCorpus); "
                             "runs with highest live under <store>/effectiveness/.../positive-highest/. Use a store of "
                             "its own: the store's mine stage is keyed by the run name.")
    parser.add_argument("--pretrain-steps", type=int, default=50)
    parser.add_argument("--synthetic-from", type=Path, default=None,
                        help="A finished corpus-only run's folder in its store (e.g. runs/artifacts/scifact-synthetic): "
                             "its mined and scored synthetic lists are used instead of synthesising again.")
    parser.add_argument("--cached-only", action="store_true",
                        help="Train nothing: write the outputs from the arms and seeds already run in --store.")
    parser.add_argument("--store", default=DEFAULT_STORE)
    parser.add_argument("--out", default=None,
                        help="Output path without suffix (default bench/results/effectiveness, -<collection> "
                             "appended for a collection other than SciFact).")
    args = parser.parse_args()
    shown = lambda v: str(v.resolve().relative_to(ROOT) if v.resolve().is_relative_to(ROOT) else v)  # noqa: E731
    settings = {k: shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k not in ("arms", "store", "out", "synthetic_from", "cached_only")}
    bench = Bench(args)
    if args.out is None:
        suffix = "" if bench.root == Path(args.store) / "effectiveness" else f"-{bench.name}"
        args.out = str(ROOT / "bench" / "results" / f"effectiveness{suffix}")
    if not bench.has_train and (needs := [a for a in args.arms if a in HUMAN]):
        parser.error(f"{args.collection}: no qrels/train.tsv, so the human-query arms cannot run: {', '.join(needs)}")
    if bench.dev is None and (args.select_lr or args.select_teacher_temperature):
        parser.error(f"{args.collection}: no dev or train split, so no setting can be chosen on dev (--select-*)")
    if args.synthetic_from:
        bench.adopt_synthetic(args.synthetic_from)
        for built_there in ("synth_passages", "filter_top_k", "teacher", "biencoder_weight", "cross_encoder", "max_passage_chars"):
            settings.pop(built_there)  # the adopted run's own settings made the synthetic lists
        settings["synthetic_from"] = str(args.synthetic_from)
    run = bench.cached if args.cached_only else bench.run_arm
    results: list[dict] = []
    selection: dict[str, dict] = {}
    fixed = Knobs(args.learning_rate, args.teacher_temperature)
    grid = [Knobs(lr, tt) for lr in args.select_lr or [fixed.lr] for tt in args.select_teacher_temperature or [fixed.teacher_temperature]]
    for name in args.arms:
        knobs = fixed.for_arm(name)
        if (args.select_lr or args.select_teacher_temperature) and name in args.select_arms:
            tried = sorted({k.for_arm(name) for k in grid})
            candidates = {k: r for k in tried if (r := run(name, args.select_seed, k)) is not None and "dev_ndcg@10" in r}
            if not candidates:
                print(f"{name}: no candidate setting run yet; skipped", flush=True)
                continue
            knobs = max(candidates, key=lambda k: (candidates[k]["dev_ndcg@10"], -k.lr))  # a tie goes to the smaller rate
            selection[name] = {"seed": args.select_seed, "chosen": knobs.label, "chosen_knobs": dataclasses.asdict(knobs),
                               "candidates": {k.label: {m: r[m] for m in ("dev_ndcg@10", "ndcg@10")}
                                              for k, r in candidates.items()}}
        for seed in [0] if name == "base" else args.seeds:
            if (result := run(name, seed, knobs)) is None:
                continue
            results.append(result)
            write_outputs(Path(args.out), settings, results, selection, bench.test, bench.dev)
            print(json.dumps(results[-1]), flush=True)
    progressive = [s for s in args.seeds if bench.train_log("progressive-human", s, fixed)]
    log = bench.train_log("progressive-human", progressive[0], fixed) if progressive else []
    chart = Path(f"{args.out}-progressive.png")
    if write_progressive(chart, results, log, bench.name):
        print(f"progressive schedule and eval: {chart}", flush=True)


if __name__ == "__main__":
    main()
