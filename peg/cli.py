"""peg's command line. Thin: parse arguments, call into the package, print results."""

from __future__ import annotations

import json
import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import click
import typer
import yaml
from rich.markup import escape
from typer.core import TyperGroup

from peg.config import ConfigError, RunConfig, json_schema, load_config
from peg.console import capture, console, forget_log_file, log_file
from peg.data import BeirDataset, DataError
from peg.data.fetch import DATASETS
from peg.errors import PegError
from peg.process import serve_as_init


class PegCommands(TyperGroup):
    """The root command group: every `PegError` raised by any command becomes one line and exit 2.

    Any other exception does too (its type, the file it names and its first line), unless `-v`
    asks for the traceback; the traceback goes to the command's log file when it has one.
    """

    def invoke(self, ctx):
        forget_log_file()
        try:
            return super().invoke(ctx)
        except PegError as e:
            fail(str(e) if e.bad_input or log_file() is None else f"{e} (full log: {log_file()})")
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, typer.Exit, typer.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the one place an unexpected error becomes one line
            if _options["verbose"]:
                raise
            if log_file() is None:
                fail(f"{one_line(e)} (rerun with -v for the traceback)")
            logging.getLogger().error("unexpected error", exc_info=True)  # the root logger: the log file only
            fail(f"{one_line(e)} (full log: {log_file()})")


def one_line(error: BaseException) -> str:
    """An exception as one line: the file an OSError names and its reason, else its type and first line."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


app = typer.Typer(
    cls=PegCommands, help="peg: train dense text-retrieval embedding models.", no_args_is_help=True, add_completion=False
)
config_app = typer.Typer(help="Inspect run configurations.", no_args_is_help=True)
data_app = typer.Typer(help="Check and fetch datasets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

ConfigPath = Annotated[Path, typer.Argument(help="Run config YAML.")]
_options = {"verbose": False}


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Show everything (library logs, Ray, torch, DeepSpeed, every rank) "
                     "instead of only peg's lines, progress bars and results; the log file gets it either way."),
    ] = False,
) -> None:
    serve_as_init()  # a container's command is PID 1: signals forwarded, orphans reaped (peg.process)
    _options["verbose"] = verbose


def begin(name: str) -> Path:
    """Start a long-running command: its noise goes to a log file (see `peg.console`)."""
    return capture(name, _options["verbose"])


def say(message: str, **style) -> None:
    console().print(message, highlight=False, markup=False, **style)


def fail(message: str) -> None:
    console().print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(2)


def check_before_run(config: RunConfig, path: Path) -> None:
    """The checks that need no work done (model, lengths, LLM paths): before a command starts any."""
    from peg.pipeline.preflight import check_before_run as check

    check(config, path)


def read_config(path: Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config; `overrides` are KEY=VALUE strings (VALUE parsed as YAML)."""
    try:
        parsed = {}
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
            parsed[key] = yaml.safe_load(value)
        return load_config(path, parsed)
    except ConfigError as e:
        fail(str(e))


@config_app.command("show")
def config_show(path: ConfigPath) -> None:
    """Print the resolved config (defaults filled in) as YAML."""
    print(yaml.safe_dump(read_config(path).model_dump(mode="json"), sort_keys=False), end="")


@config_app.command("schema")
def config_schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Write the run config's JSON schema."""
    text = json.dumps(json_schema(), indent=2) + "\n"
    if output:
        try:
            output.write_text(text)
        except OSError as e:
            fail(f"{output}: cannot write: {e.strerror}")
    else:
        sys.stdout.write(text)


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="A BEIR folder or a training-pair JSONL file.")],
    split: Annotated[list[str] | None, typer.Option(help="qrels split(s) to check (default: all found).")] = None,
) -> None:
    """Validate a dataset: report counts and every problem found (file and line)."""
    from peg.data.check import check_path

    try:
        report = check_path(path, split)
    except DataError as e:
        fail(str(e))
    for name, count in report.counts.items():
        say(f"{name}: {count:,}")
    for problem in report.problems:
        say(f"problem: {problem}", style="red")
    if report.problems:
        console().print(f"[bold red]{len(report.problems)} problem(s)[/]")
        raise typer.Exit(1)
    console().print("[bold green]ok[/]")


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help=f"BEIR dataset: {', '.join(DATASETS)}.")],
    to: Annotated[
        Path | None, typer.Option("--to", help="Parent folder for NAME/ (default: $PEG_DATA_DIR or ~/.cache/peg/datasets).")
    ] = None,
) -> None:
    """Download a BEIR dataset (checksum verified, unpacked atomically, cached) and print its folder."""
    from peg.data.fetch import dataset_folder, fetch_dataset

    cached = dataset_folder(name, to).is_dir()  # a FetchError (a PegError) is one line, exit 2
    folder = fetch_dataset(name, to)
    if not cached:
        spec = DATASETS[name]
        say(f"{name}: licence {spec.licence}; see {spec.homepage}")
    print(folder)


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option(help="Model directory or hub id (packaged models resolve offline).")],
    data: Annotated[Path, typer.Option(help="BEIR folder.")],
    split: Annotated[str, typer.Option(help="qrels split to evaluate.")] = "test",
    output: Annotated[Path | None, typer.Option(help="Write run.trec, metrics.json, metrics.md here.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    pooling: Annotated[str | None, typer.Option(help="mean, cls or last (default: from the model folder).")] = None,
) -> None:
    """Evaluate a model on a BEIR split: nDCG@10, MAP@100, MRR@10, Recall@10/100."""
    from peg.eval import evaluate_model
    from peg.eval.retrieval import markdown_table
    from peg.model import check_model, model_config_for

    if output is not None and output.exists() and not output.is_dir():
        fail(f"--output {output}: exists and is not a directory")
    log = begin("eval")
    check_model(model)
    overrides = {"pooling": pooling} if pooling else {}
    model_config = model_config_for(model, **overrides)
    dataset = BeirDataset.load(data, split, allow_empty=True)
    result = evaluate_model(model_config, dataset, batch_size=batch_size)
    print(markdown_table({model: result.metrics}), end="", file=console().file)
    if output:
        paths = result.write(output, title=model)
        say(f"wrote {paths['run']}, {paths['json']}, {paths['markdown']}")
    say(f"log: {log}")


def run_stage_command(path: Path, name: str) -> None:
    """A single-stage command (`peg encode|mine|judge|score|synth CONFIG`): the pipeline's own
    stage entrypoint, after the stages it needs that are not complete; prints the stage's summary."""
    from peg.pipeline.runner import run_with_needs

    config = read_config(path)
    check_before_run(config, path)
    log = begin(name)
    done = run_with_needs(config, path.resolve(), name, log=say)
    say("\n".join([*done.summary, f"log: {log}"]))


STAGE_COMMANDS = {  # `peg NAME CONFIG`: one pipeline stage, after the stages it needs
    "encode": "Encode the corpus and the train-split queries (Ray Data; cached in the store by model + data hash).",
    "mine": "Mine hard negatives for the train split (sharded FAISS on Ray); resumes from stored query shards.",
    "judge": "LLM false-negative judge: drop mined negatives the LLM scores as relevant (Ray; resumes from stored shards).",
    "score": "Teacher scores (cross-encoder or LLM) for each query's candidate list (Ray; resumes from stored shards).",
    "synth": "Synthetic queries from the corpus, round-trip filtered (Ray; resumes from stored shards).",
}


def add_stage_command(name: str, help_text: str) -> None:
    def command(path: ConfigPath) -> None:
        run_stage_command(path, name)

    app.command(name, help=help_text)(command)


for _name, _help in STAGE_COMMANDS.items():
    add_stage_command(_name, _help)


store_app = typer.Typer(help="Inspect the artifact store.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("ls")
def store_ls(
    path: ConfigPath,
    prefix: Annotated[str, typer.Argument(help="Key prefix (a path: 'myrun/mine'); default: the whole store.")] = "",
) -> None:
    """List the stored artifacts (size, producer stage, created time, key)."""
    from peg.store import StoreError, open_store

    config = read_config(path)
    try:
        store = open_store(config.store)
        keys = store.list(prefix)
        for key in keys:
            m = store.manifest(key)
            if m is not None:
                print(f"{m.size:>14,}  {m.producer:<10}  {m.created}  {key}")
    except StoreError as e:
        fail(str(e))
    if not keys:
        say(f"no artifacts under {prefix or '(the whole store)'!r} in {store.describe()}")


@store_app.command("get")
def store_get(
    path: ConfigPath,
    prefix: Annotated[str, typer.Argument(help="Key prefix to copy, e.g. 'myrun/export/model'.")],
    dest: Annotated[Path, typer.Argument(help="Local folder to create (must not exist).")],
) -> None:
    """Copy the artifacts under PREFIX into a plain folder: verified, without the store's manifests."""
    from peg.store import StoreError, open_store

    config = read_config(path)
    if dest.exists():
        fail(f"{dest}: already exists (give a new folder)")
    try:
        open_store(config.store).materialise_prefix(prefix, dest)
    except StoreError as e:
        fail(str(e))
    say(f"wrote {dest}")


pipeline_app = typer.Typer(help="Run the whole pipeline: prepare -> ... -> report.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")


class BackendName(StrEnum):
    local = "local"
    k8s = "k8s"
    docker = "docker"


@pipeline_app.command("run")
def pipeline_run(
    path: ConfigPath,
    backend: Annotated[BackendName, typer.Option(
        help="local: processes here; k8s: each stage as its cluster job; docker: each stage's "
             "rendered pods as containers here (the CPU images, images/build.sh).")] = BackendName.local,
    wait: Annotated[float, typer.Option(min=0, help="Seconds to wait while another process runs this run.")] = 0,
) -> None:
    """Run every stage that is not complete (a rerun skips completed stages and redoes invalid ones)."""
    from peg.pipeline import LocalBackend, StageFailed, current_lease, pipeline_results, run_pipeline
    from peg.pipeline.results import EXPORTED_MODEL, result_key
    from peg.store import open_store
    from peg.store.lease import LeaseHeld

    config = read_config(path)
    if backend is BackendName.local:  # in a cluster the model is where the pods are
        check_before_run(config, path)
    current_lease(config, open_store(config.store))  # a store that cannot be used: said before any work, no rerun helps
    log = begin("pipeline")
    say(f"peg pipeline {config.name}: store {config.store.uri}; full log: {log}")
    if backend is BackendName.k8s:
        from peg.k8s import check_renderable
        from peg.k8s.backend import K8sBackend

        check_renderable(config)
        runner_backend = K8sBackend(config, log=say)
    elif backend is BackendName.docker:
        from peg.k8s.pods import DockerBackend

        runner_backend = DockerBackend(config, log=say)
    else:
        runner_backend = LocalBackend()
    try:
        seconds = run_pipeline(config, path.resolve(), runner_backend, log=say, wait=wait)
    except StageFailed as e:
        if e.reported:  # the stage printed its own one-line error
            raise typer.Exit(2) from None
        fail(f"{e} (full log: {log}); rerun `peg pipeline run {path}` to resume")
    except LeaseHeld as e:
        fail(f"{e} (if that process is gone for good: peg pipeline break-lease {path} --host HOST --pid PID)")
    except PegError as e:
        fail(str(e) if e.bad_input else f"{e} (full log: {log}); rerun `peg pipeline run {path}` to resume")
    if seconds:
        say("ran " + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()))
    for line in pipeline_results(config, open_store(config.store)):
        say(line)
    say(f"the model as a plain folder: peg store get {path} {result_key(config.name, EXPORTED_MODEL)} DEST")


@app.command("render")
def render_command(
    path: ConfigPath,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write one YAML file per object here (default: stdout).")] = None,
    stage: Annotated[str | None, typer.Option(help="Only this stage's job(s) and the ConfigMap.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE config override (YAML value), repeatable.")] = None,
) -> None:
    """Render kubectl-ready objects: the config's ConfigMap and each cluster stage's TrainJob /
    PyTorchJob / RayJob (`prepare` runs where the data is: `peg pipeline stage prepare CONFIG`)."""
    from peg.k8s import render_config_map, render_run, render_stage
    from peg.k8s.render import manifest_files
    from peg.store.files import write_atomically

    config = read_config(path, overrides)
    if output is not None and output.exists() and not output.is_dir():
        fail(f"--output {output}: exists and is not a directory (render writes one file per object into a folder)")
    try:
        objects = [render_config_map(config), *render_stage(config, stage)] if stage else render_run(config)
    except ConfigError as e:
        fail(str(e))
    files = manifest_files(objects)
    if output is None:
        sys.stdout.write("---\n".join(files.values()))
        return
    output.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_atomically(output / name, text)
    say(f"wrote {len(files)} files to {output}")


@app.command("submit")
def submit_command(
    path: ConfigPath,
    stage: Annotated[str, typer.Option(help="The stage to run on the cluster.")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow status and logs until the job ends.")] = True,
) -> None:
    """Create a stage's job on the cluster (kubeconfig) and follow its status and logs."""
    from peg.k8s.backend import K8sBackend
    from peg.k8s.client import ClusterError
    from peg.pipeline import StageFailed

    config = read_config(path)
    try:
        phase = K8sBackend(config, log=say).submit(stage, wait)
    except (ConfigError, ClusterError, StageFailed) as e:
        fail(str(e))
    say(f"stage {stage}: {phase}")


@pipeline_app.command("status")
def pipeline_status_command(path: ConfigPath) -> None:
    """Show each stage's state: complete, partial (interrupted), stale (config changed) or pending."""
    from rich.console import Console
    from rich.table import Table

    from peg.pipeline import current_lease, pipeline_status
    from peg.store import StoreError, open_store

    config = read_config(path)
    try:
        store = open_store(config.store)
        rows = pipeline_status(config, store)
        holder = current_lease(config, store)
    except StoreError as e:
        fail(str(e))
    table = Table("stage", "state", "outputs", "detail")
    for row in rows:
        table.add_row(row.name, row.state, str(row.outputs), row.detail)
    Console().print(table)  # a result: stdout
    if holder is not None:
        say(f"in use by {holder.describe()}")


@pipeline_app.command("break-lease")
def pipeline_break_lease(
    path: ConfigPath,
    host: Annotated[str, typer.Option(help="The holder's host, as `peg pipeline status` shows it.")],
    pid: Annotated[int, typer.Option(help="The holder's pid, as `peg pipeline status` shows it.")],
) -> None:
    """Remove the run's lease held by a process that is gone (a lost machine): only if it still
    names that host and pid. Never break the lease of a live run: two writers would share the run."""
    from peg.store import open_store
    from peg.store.lease import break_lease

    config = read_config(path)
    record = break_lease(open_store(config.store), config.name, host, pid)
    say(f"broke the lease of run {config.name!r}: {record.command!r} (pid {record.pid} on {record.host})")


@pipeline_app.command("stage")
def pipeline_stage(
    name: Annotated[str, typer.Argument(help="Stage name.")],
    path: ConfigPath,
) -> None:
    """Run one stage and mark it complete: the entrypoint local processes and pods both run."""
    from peg.pipeline import run_stage_entrypoint

    config = read_config(path)
    begin(f"stage-{name}")
    try:
        run_stage_entrypoint(config, path.resolve(), name)
    except (PegError, ValueError) as e:  # every stage's own errors are PegErrors: no heavy imports here
        bad_input = isinstance(e, ValueError) or e.bad_input
        fail(f"stage {name}: {e}" if bad_input else f"stage {name}: {e} (full log: {log_file()})")
    except Exception as e:  # noqa: BLE001 - the pipeline shows this one line, the log the traceback
        if _options["verbose"]:
            raise
        logging.getLogger().error("stage %s failed", name, exc_info=True)
        fail(f"stage {name}: {one_line(e)} (full log: {log_file()})")


@app.command("pretrain")
def pretrain_command(
    path: ConfigPath,
    output: Annotated[Path, typer.Option("--output", "-o", help="Local output directory.")] = Path("peg-pretrain"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --output.")] = False,
) -> None:
    """Masked auto-encoding pretraining on data.beir's corpus (RetroMAE-style, `pretrain` section),
    distributed like `peg train`; export the encoder to OUTPUT/model for `train` to start from."""
    from peg.train.pretrain import pretrain

    config = read_config(path)
    check_before_run(config, path)
    log = begin("pretrain")
    model_dir = pretrain(config, output, resume=resume)
    say(f"model: {model_dir}\nlog: {log}")


@app.command("train")
def train_command(
    path: ConfigPath,
    output: Annotated[Path, typer.Option("--output", "-o", help="Local output directory.")] = Path("peg-train"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --output.")] = False,
) -> None:
    """Train with DeepSpeed under torchrun (started here with train.nproc_per_node processes
    unless already inside torchrun / a PyTorchJob pod); export the model to OUTPUT/model."""
    from peg.train import train
    from peg.train.selection import best_summary

    config = read_config(path)
    check_before_run(config, path)
    log = begin("train")
    model_dir = train(config, output, resume=resume)
    if best := best_summary(output):
        say(best)
    say(f"model: {model_dir}\nlog: {log}")


operator_app = typer.Typer(help="The pipeline operator: its CRD and EmbeddingPipeline manifests.", no_args_is_help=True)
app.add_typer(operator_app, name="operator")
OutputFile = Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")]


def _write(text: str, output: Path | None) -> None:
    if output:
        output.write_text(text)
        say(f"wrote {output}")
    else:
        sys.stdout.write(text)


@operator_app.command("crd")
def operator_crd(output: OutputFile = None) -> None:
    """Write the EmbeddingPipeline CRD (generated from the run config and the operator's models)."""
    from peg.operator.crd import crd_yaml

    _write(crd_yaml(), output)


@operator_app.command("manifest")
def operator_manifest(path: ConfigPath, output: OutputFile = None) -> None:
    """Write an EmbeddingPipeline that runs CONFIG (name: the run name; namespace: cluster.namespace)."""
    from peg.k8s import check_renderable
    from peg.operator.crd import pipeline_manifest

    config = read_config(path)
    check_renderable(config)  # every check `peg render` makes: the operator renders the same objects
    run = yaml.safe_load(path.read_text())
    manifest = pipeline_manifest(run, config.cluster.namespace, config.name)
    header = f"# EmbeddingPipeline for {path.name} (`peg operator manifest {path.name}`); kubectl apply -f this file.\n"
    _write(header + yaml.safe_dump(manifest, sort_keys=False), output)
