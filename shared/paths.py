"""Where the read-only demo models and data live: `../shared` beside the project root.

`SPECDEC_SHARED_DIR` overrides it (CI and containers mount it elsewhere).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    return Path(os.environ.get("SPECDEC_SHARED_DIR", PROJECT_ROOT.parent / "shared")).resolve()


def models_dir() -> Path:
    return shared_dir() / "models"


def data_dir() -> Path:
    return shared_dir() / "data"
