"""Load HF causal LMs and tokenizers from a local directory (never from a hub)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from shared.config import ModelConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def set_num_threads(num_threads: int) -> None:
    """One torch thread by default: with 2 cores OpenMP spinning makes small ops slower."""
    os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
    torch.set_num_threads(num_threads)


def load_model(config: ModelConfig) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    set_num_threads(config.num_threads)
    model = AutoModelForCausalLM.from_pretrained(
        str(config.model_dir), dtype=DTYPES[config.dtype], local_files_only=True
    )
    return model.to(config.device).eval()


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def tokenizer_hash(model_dir: str | Path) -> str:
    """First 16 hex chars of sha256 over the tokenizer's canonical JSON.

    Canonical = the `model` (vocabulary, merges) and `added_tokens` sections of
    `tokenizer.json`, dumped with sorted keys; formatting and unrelated fields
    (truncation, padding) do not change the hash.
    """
    with open(Path(model_dir) / "tokenizer.json") as f:
        tok = json.load(f)
    canonical = {
        "model": tok.get("model"),
        "added_tokens": tok.get("added_tokens"),
        "pre_tokenizer": tok.get("pre_tokenizer"),
        "decoder": tok.get("decoder"),
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def context_hash(token_ids: list[int]) -> str:
    """First 16 hex chars of blake2b over little-endian int32 token ids (store keys)."""
    import numpy as np

    return hashlib.blake2b(np.asarray(token_ids, dtype="<i4").tobytes()).hexdigest()[:16]
