"""BEIR datasets by name: downloaded from BEIR's public archive, verified, unpacked, cached.

`fetch_dataset("scifact")` returns `<cache>/scifact` (corpus.jsonl, queries.jsonl, qrels/), where
the cache is `~/.cache/peg/datasets` or `$PEG_DATA_DIR`. A folder that is already there is used as
is, so pointing `PEG_DATA_DIR` at a folder holding local copies (`<dir>/scifact/...`) works offline.
A download is checked against the archive checksum pinned here, unpacked into a temporary folder
and moved into place with one `os.replace`: the dataset folder exists complete or not at all.
A file lock per dataset makes concurrent fetches (processes, pods on a shared volume) download once.

`beir:NAME` in `data.beir` resolves through the same cache (`resolve_beir`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from peg.config import BEIR_PREFIX
from peg.data.errors import DataError
from peg.progress import progress_bar

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"
URL_ENV = "PEG_BEIR_URL"
CACHE_ENV = "PEG_DATA_DIR"
_CHUNK = 1 << 16


class FetchError(DataError):
    """A dataset that could not be fetched; `str()` reads `<URL or path>: <what went wrong>`."""

    def __init__(self, where: str | Path, message: str):
        super().__init__(where, None, message)


@dataclass(frozen=True)
class BeirArchive:
    """One BEIR zip: `<base URL>/<name>.zip` holding a `<name>/` folder.

    `checksum` is `<hashlib algorithm>:<hex digest>` of the zip. BEIR publishes md5 only (its
    README's dataset table; ir_datasets' downloads.json pins the same values), so these are md5.
    `size` is the zip's size in bytes as ir_datasets records it: the progress bar's total only.
    """

    name: str
    checksum: str
    size: int
    licence: str
    homepage: str


# Checksums: BEIR README (beir-cellar/beir @ ef83d29, "md5" column), identical in
# ir_datasets/etc/downloads.json (allenai/ir_datasets @ ae24b53), which also gives the sizes.
# Licences: as the sources state them; where none is stated, the homepage says what applies.
DATASETS: dict[str, BeirArchive] = {
    a.name: a
    for a in (
        BeirArchive("scifact", "md5:5f7d1de60b170fc8027bb7898e2efca1", 2_816_079,
                    "CC BY-NC 2.0 (non-commercial)", "https://github.com/allenai/scifact"),
        BeirArchive("nfcorpus", "md5:a89dba18a62ef92f7d323ec890a0d38d", 2_448_432,
                    "not stated by BEIR; see the homepage", "https://www.cl.uni-heidelberg.de/statnlpgroup/nfcorpus/"),
        BeirArchive("fiqa", "md5:17918ed23cd04fb15047f73e6c3bd9d9", 17_948_027,
                    "not stated by BEIR; see the homepage", "https://sites.google.com/view/fiqa/"),
        BeirArchive("trec-covid", "md5:ce62140cb23feb9becf6270d0d1fe6d1", 73_876_720,
                    "not stated by BEIR; CORD-19's terms apply, see the homepage", "https://ir.nist.gov/covidSubmit/index.html"),
        BeirArchive("arguana", "md5:8ad3e3c2a5867cdced806d6503f29b99", 3_773_617,
                    "CC BY-SA 4.0", "http://argumentation.bplaced.net/arguana/data"),
        BeirArchive("scidocs", "md5:38121350fc3a4d2f48850f6aff52e4a9", 142_471_588,
                    "CC BY-SA 4.0", "https://allenai.org/data/scidocs"),
    )
}


def cache_dir() -> Path:
    """Where fetched datasets live: `$PEG_DATA_DIR`, else `~/.cache/peg/datasets`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peg" / "datasets")


def archive(name: str) -> BeirArchive:
    """The catalogue entry for `name`; an unknown name is a `FetchError` listing the known ones."""
    if name not in DATASETS:
        raise FetchError(f"{BEIR_PREFIX}{name}", f"unknown dataset (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def dataset_folder(name: str, to: str | Path | None = None) -> Path:
    """Where `fetch_dataset(name, to)` puts (or finds) the dataset: `<to or cache>/<name>`."""
    archive(name)
    return Path(to if to is not None else cache_dir()) / name


def fetch_dataset(name: str, to: str | Path | None = None, show_progress: bool = True) -> Path:
    """The folder of BEIR dataset `name`, downloaded and verified on first use, else as found."""
    spec = archive(name)
    target = dataset_folder(name, to)
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(target.parent / f".{name}.lock")
        lock.acquire()
    except OSError as e:
        raise FetchError(target.parent, f"cannot write the dataset here: {e.strerror or e}") from None
    try:
        if not target.is_dir():  # else another process fetched it while we waited
            _fetch_into(spec, target, show_progress)
    finally:
        lock.release()
    return target


def resolve_beir(value: str | Path) -> Path:
    """A `data.beir` value as a folder: `beir:NAME` is fetched on first use; anything else is a path."""
    text = str(value)
    if text.startswith(BEIR_PREFIX):
        return fetch_dataset(text.removeprefix(BEIR_PREFIX))
    return Path(value)


def _fetch_into(spec: BeirArchive, target: Path, show_progress: bool) -> None:
    """Download, verify and unpack in a temporary folder beside `target`, then move it into place."""
    url = f"{(os.environ.get(URL_ENV) or BEIR_URL).rstrip('/')}/{spec.name}.zip"
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}.") as tmp:
        zip_path = Path(tmp) / f"{spec.name}.zip"
        _download(url, zip_path, spec, show_progress)
        unpacked = Path(tmp) / "unpacked"
        _unpack(url, zip_path, unpacked)
        if not (unpacked / spec.name).is_dir():
            raise FetchError(url, f"the archive has no '{spec.name}/' folder")
        os.replace(unpacked / spec.name, target)


def _download(url: str, dest: Path, spec: BeirArchive, show_progress: bool) -> None:
    """Stream `url` to `dest`, hashing as it goes; raise on HTTP errors, truncation or a bad checksum."""
    algorithm, expected = spec.checksum.split(":", 1)
    digest = hashlib.new(algorithm)
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length else spec.size
            with progress_bar(total, f"download {spec.name}", enabled=show_progress, unit="bytes") as advance:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    advance(len(chunk))
    except urllib.error.HTTPError as e:
        raise FetchError(url, f"HTTP {e.code} {e.reason}") from None
    except (http.client.IncompleteRead, ConnectionError) as e:
        raise FetchError(url, f"download truncated after {received:,} bytes ({e.__class__.__name__})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise FetchError(url, f"download failed: {reason}") from None
    if length and received != int(length):
        raise FetchError(url, f"download truncated: got {received:,} of {int(length):,} bytes")
    got = digest.hexdigest()
    if got != expected:
        raise FetchError(url, f"checksum mismatch: expected {algorithm}:{expected}, got {algorithm}:{got} ({received:,} bytes)")


def _unpack(url: str, zip_path: Path, dest: Path) -> None:
    """Extract the verified zip into `dest` (zipfile drops absolute and `..` member paths)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(dest)
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(url, f"cannot unpack the archive: {e}") from None
