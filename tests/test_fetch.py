"""`peg data fetch` / `beir:NAME` against a real HTTP server on 127.0.0.1 serving a SciFact zip."""

import hashlib
import io
import os
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peg.cli import app
from peg.config import load_config
from peg.data import BeirDataset
from peg.data import fetch as fetch_module
from peg.data.fetch import FetchError, fetch_dataset
from shared_data import SCIFACT

pytestmark = pytest.mark.skipif(not SCIFACT.is_dir(), reason="needs ../shared/data/scifact")


class Archive:
    """What the server sends for /scifact.zip and how (whole, cut short, slowly), counting requests."""

    def __init__(self, data: bytes):
        self.data = data
        self.requests: list[str] = []
        self.truncate_at: int | None = None
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()


def make_zip() -> bytes:
    """BEIR's layout: scifact/corpus.jsonl, scifact/queries.jsonl, scifact/qrels/{train,test}.tsv."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted(p for p in SCIFACT.rglob("*") if p.is_file() and p.name != "SOURCE.md"):
            zf.write(path, f"scifact/{path.relative_to(SCIFACT).as_posix()}")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    archive = Archive(make_zip())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            archive.requests.append(self.path)
            if self.path != "/beir/scifact.zip":
                self.send_error(404)
                return
            archive.started.set()
            archive.release.wait(10)
            body = archive.data
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: archive.truncate_at] if archive.truncate_at else body)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield archive, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def served(server, monkeypatch, tmp_path):
    """Fetcher pointed at the server (base URL + cache), with the test zip's checksum pinned."""
    archive, url = server
    archive.requests.clear()
    archive.truncate_at = None
    archive.started.clear()
    archive.release.set()
    monkeypatch.setenv("PEG_BEIR_URL", f"{url}/beir")
    monkeypatch.setenv("PEG_DATA_DIR", str(tmp_path / "cache"))
    pinned = replace(fetch_module.DATASETS["scifact"], checksum="sha256:" + hashlib.sha256(archive.data).hexdigest())
    monkeypatch.setitem(fetch_module.DATASETS, "scifact", pinned)
    return archive


def served_url() -> str:
    return os.environ["PEG_BEIR_URL"] + "/scifact.zip"


def leftovers(root: Path) -> set[str]:
    """Everything in the cache folder but the lock file."""
    return {p.name for p in root.iterdir()} - {".scifact.lock"}


def test_fetch_then_cache_hit(served, tmp_path):
    folder = fetch_dataset("scifact", show_progress=False)
    assert folder == tmp_path / "cache" / "scifact"
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
        assert (folder / name).read_bytes() == (SCIFACT / name).read_bytes()
    assert leftovers(tmp_path / "cache") == {"scifact"}
    assert fetch_dataset("scifact", show_progress=False) == folder
    assert served.requests == ["/beir/scifact.zip"]  # the second call made no request


def test_md5_pin_and_to(served, tmp_path, monkeypatch):
    pinned = replace(fetch_module.DATASETS["scifact"], checksum="md5:" + hashlib.md5(served.data).hexdigest())
    monkeypatch.setitem(fetch_module.DATASETS, "scifact", pinned)
    assert fetch_dataset("scifact", to=tmp_path / "elsewhere", show_progress=False) == tmp_path / "elsewhere" / "scifact"
    assert (tmp_path / "elsewhere" / "scifact" / "qrels" / "test.tsv").is_file()
    assert not (tmp_path / "cache").exists()


def test_checksum_mismatch_leaves_nothing(served, tmp_path, monkeypatch):
    wrong = "sha256:" + "0" * 64
    monkeypatch.setitem(fetch_module.DATASETS, "scifact", replace(fetch_module.DATASETS["scifact"], checksum=wrong))
    with pytest.raises(FetchError) as e:
        fetch_dataset("scifact", show_progress=False)
    got = hashlib.sha256(served.data).hexdigest()
    assert str(e.value) == (
        f"{served_url()}: checksum mismatch: expected {wrong}, got sha256:{got} ({len(served.data):,} bytes)"
    )
    assert leftovers(tmp_path / "cache") == set()


def test_truncated_download_leaves_nothing(served, tmp_path):
    served.truncate_at = len(served.data) // 2
    with pytest.raises(FetchError) as e:
        fetch_dataset("scifact", show_progress=False)
    size = len(served.data)
    assert str(e.value) == f"{served_url()}: download truncated: got {size // 2:,} of {size:,} bytes"
    assert leftovers(tmp_path / "cache") == set()


def test_http_404_names_url_and_status(served, monkeypatch, tmp_path):
    base = served_url().rsplit("/beir/", 1)[0]
    monkeypatch.setenv("PEG_BEIR_URL", f"{base}/missing")
    with pytest.raises(FetchError) as e:
        fetch_dataset("scifact", show_progress=False)
    assert str(e.value) == f"{base}/missing/scifact.zip: HTTP 404 Not Found"
    assert leftovers(tmp_path / "cache") == set()


def test_concurrent_fetch_downloads_once(served, tmp_path):
    """Two callers at once: the second waits on the lock, then finds the folder the first made."""
    served.release.clear()  # hold the first download until the second caller has started
    results: dict[str, Path | BaseException] = {}

    def call(tag):
        try:
            results[tag] = fetch_dataset("scifact", show_progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results[tag] = e

    first = threading.Thread(target=call, args=("first",))
    first.start()
    assert served.started.wait(10)
    second = threading.Thread(target=call, args=("second",))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # blocked on the lock while the first download is in flight
    served.release.set()
    first.join(30)
    second.join(30)
    folder = tmp_path / "cache" / "scifact"
    assert results == {"first": folder, "second": folder}
    assert served.requests == ["/beir/scifact.zip"]
    assert (folder / "corpus.jsonl").stat().st_size == (SCIFACT / "corpus.jsonl").stat().st_size


def test_local_copy_in_data_dir_is_used_as_is(served, monkeypatch):
    """PEG_DATA_DIR naming a folder that holds scifact/ (read-only here) needs no download."""
    monkeypatch.setenv("PEG_DATA_DIR", str(SCIFACT.parent))
    assert fetch_dataset("scifact", show_progress=False) == SCIFACT
    assert served.requests == []


def test_unwritable_destination_is_a_fetch_error(served, tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FetchError, match=r"a-file: cannot write the dataset here"):
        fetch_dataset("scifact", to=tmp_path / "a-file", show_progress=False)
    assert served.requests == []


def test_config_beir_name_resolves_through_the_cache(served, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: t\ndata:\n  beir: beir:scifact\nmodel:\n  name_or_path: m\n")
    config = load_config(path)
    assert config.data.beir == "beir:scifact"
    data = BeirDataset.load(config.data.beir, "test")
    assert data.folder == tmp_path / "cache" / "scifact"
    assert (len(data.corpus), len(data.queries)) == (5183, 300)
    BeirDataset.load(config.data.beir, "train")
    assert served.requests == ["/beir/scifact.zip"]


def test_cli_prints_licence_on_first_fetch_only(served, tmp_path):
    runner = CliRunner()
    first = runner.invoke(app, ["data", "fetch", "scifact"])
    assert first.exit_code == 0, first.output
    assert first.stdout == f"{tmp_path / 'cache' / 'scifact'}\n"
    assert "scifact: licence CC BY-NC 2.0" in first.stderr
    again = runner.invoke(app, ["data", "fetch", "scifact"])
    assert (again.exit_code, again.stdout, again.stderr) == (0, first.stdout, "")
    unknown = runner.invoke(app, ["data", "fetch", "nope"])
    assert unknown.exit_code == 2
    assert "beir:nope: unknown dataset (known: scifact, nfcorpus, fiqa, trec-covid, arguana, scidocs)" in unknown.stderr
