"""Where the tests find the machine's shared folder (vendored CRDs, SciFact): `$PEG_SHARED`, else
`shared/` beside the checkout (or one level up, for a worktree under wt/)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The shared folder; `REPO.parent / "shared"` when none is found (tests then say it is missing)."""
    if os.environ.get("PEG_SHARED"):
        return Path(os.environ["PEG_SHARED"])
    for candidate in (REPO.parent / "shared", REPO.parent.parent / "shared"):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared"


SCIFACT = shared_dir() / "data" / "scifact"
