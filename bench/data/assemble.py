"""Assemble the extra BEIR-format collections of the effectiveness benchmarks from a local copy of
their public source, verified file by file, into `bench/data/<name>/` (kept out of git and CI).

    python bench/data/assemble.py nfcorpus --mirror /work/.mirror/KID-22+Cocktail/repo
    python bench/data/assemble.py nq-utd --zip nq-utd.zip --to /some/folder

The source is a git mirror of GitHub `KID-22/Cocktail` (`--mirror`: the zip is read as the git
blob pinned below, whatever the mirror's branch) or the zip itself (`--zip`). Each output file is
a byte-for-byte copy of one zip member and must have the sha256 pinned here; the collection is
written into a temporary folder and moved into place with one `os.replace`, so `<to>/<name>`
exists complete or not at all. Provenance, licence and counts: `bench/data/<name>/SOURCE.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Collection:
    """One collection: the git blob of its zip in the source repository, and each output file as
    (zip member, sha256 of its bytes)."""

    zip_path: str
    zip_blob: str
    files: dict[str, tuple[str, str]]


COCKTAIL = "KID-22/Cocktail"
COLLECTIONS: dict[str, Collection] = {
    "nfcorpus": Collection(
        "dataset/nfcorpus.zip", "7b1f00230a6670c8d6f9a23049f0fe5fcd27d9ab",
        {
            "corpus.jsonl": ("corpus/human.jsonl", "9127e0e7f4f89587540be1f1f350eec2a5bc203253f70517b8f34557a71e24ba"),
            "queries.jsonl": ("queries.jsonl", "d024e6621b84925d485ae473d316a0c3af31c62c8068a59fb29d22f7613aef2a"),
            "qrels/train.tsv": ("qrels/train.tsv", "6336b80f9bffc4f063f3aa450047ad35c0b7c534efe4a6ba35e16dbace047f6a"),
            "qrels/dev.tsv": ("qrels/dev.tsv", "b1d38b5e8f78c4a5820bce2b7ec2db54911d7690dc601e76811846b211180bd8"),
            "qrels/test.tsv": ("qrels/test.tsv", "f8fba6ef3d4dd9c3a242a8ba4ae38276fc3622fce7dcbae764766d564542fd2a"),
        },
    ),
    "nq-utd": Collection(
        "dataset/nq-utd.zip", "702cb1eb73ed44d1b817bb1f5fd8f3376e6cf818",
        {
            "corpus.jsonl": ("corpus/human.jsonl", "2ff632a80903a080c2241b9fd070fe1d32cb22cb9a9ea061307306f5683832f9"),
            "queries.jsonl": ("queries.jsonl", "0530d21d603b67ea62a26bcf2c586173b80d77aae8501c98b8602358c54290c4"),
            "qrels/test.tsv": ("qrels/test.tsv", "a364f8d829c93052b190b7cf9e1e69ae32780ec6a0a1b9ca532b48cdddb1e012"),
        },
    ),
}


def read_zip(collection: Collection, mirror: Path | None, zip_file: Path | None) -> bytes:
    """The source zip's bytes: the pinned blob of a git mirror, or a zip file as given."""
    if zip_file is not None:
        return zip_file.read_bytes()
    done = subprocess.run(["git", "--git-dir", str(mirror), "cat-file", "blob", collection.zip_blob],
                          capture_output=True)
    if done.returncode != 0:
        sys.exit(f"{mirror}: no blob {collection.zip_blob} ({collection.zip_path} of {COCKTAIL}): "
                 f"{done.stderr.decode().strip()}")
    return done.stdout


def assemble(name: str, data: bytes, to: Path) -> Path:
    """Write collection `name` from its zip's bytes into `<to>/<name>`, every file checked against
    its pinned sha256 before the folder is moved into place; returns the folder."""
    collection = COLLECTIONS[name]
    target = to / name
    to.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as archive, tempfile.TemporaryDirectory(dir=to, prefix=f".{name}-") as tmp:
        for out, (member, sha256) in collection.files.items():
            content = archive.read(member)
            if (got := hashlib.sha256(content).hexdigest()) != sha256:
                sys.exit(f"{member} in the {name} zip: sha256 {got}, expected {sha256}")
            path = Path(tmp) / name / out
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        if target.exists():  # files of the folder's own (SOURCE.md, committed) stay
            for kept in target.iterdir():
                if kept.is_file() and kept.name not in collection.files:
                    shutil.copy2(kept, Path(tmp) / name / kept.name)
            shutil.rmtree(target)
        os.replace(Path(tmp) / name, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=list(COLLECTIONS))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mirror", type=Path, help=f"A git directory of {COCKTAIL} (e.g. from the search tool's fetch).")
    source.add_argument("--zip", type=Path, help="The collection's zip from that repository.")
    parser.add_argument("--to", type=Path, default=HERE, help="Parent folder of the collection (default bench/data).")
    args = parser.parse_args()
    folder = assemble(args.name, read_zip(COLLECTIONS[args.name], args.mirror, args.zip), args.to)
    print(folder)


if __name__ == "__main__":
    main()
