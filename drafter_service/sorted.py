"""`sorted` (S2D): one nested drafter whose exits serve every target with the same tokenizer.

A sorted drafter is a directory written by `tools.train_sorted`: an HF Llama plus
`sorted.json` (`SortedExitsConfig`: exits, default thresholds, matmul dtype, how it was
trained). `SortedProposerFactory(DrafterConfig)` loads it into the lean incremental forward
of `nested_model.NestedDrafter`; its sessions are `nested.NestedProposer`s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drafter_service.nested import NestedProposerFactory
from drafter_service.nested_model import NestedDrafter, check_exits
from shared.loading import DTYPES, load_model, tokenizer_hash

if TYPE_CHECKING:
    from shared.config import DrafterConfig

SORTED_CONFIG_FILE = "sorted.json"


class SortedExitsConfig(BaseModel):
    """What `sorted.json` (beside config.json) holds: the exits and their default thresholds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exits: list[int] = Field(..., min_length=1, description="Exit depths (layers), increasing.")
    thresholds: dict[int, float] = Field(
        default_factory=dict,
        description="Default confidence threshold per exit (missing: never exit there; the "
        "deepest exit always emits).",
    )
    tokenizer_hash: str | None = Field(
        None, description="shared.loading.tokenizer_hash of the directory."
    )
    matmul_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="Dtype of the projection/head weights in the lean forward."
    )
    training: dict | None = Field(None, description="How the drafter was trained (free form).")

    @field_validator("exits")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        return check_exits(value)

    @model_validator(mode="after")
    def _known_thresholds(self) -> SortedExitsConfig:
        unknown = set(self.thresholds) - set(self.exits)
        if unknown:
            raise ValueError(f"thresholds for unknown exits {sorted(unknown)}; exits {self.exits}")
        return self

    @classmethod
    def load(cls, model_dir: str | Path) -> SortedExitsConfig:
        path = Path(model_dir) / SORTED_CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"{str(model_dir)!r} is not a sorted drafter: no {SORTED_CONFIG_FILE}")
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as e:
            raise ValueError(f"bad {path}: {e}") from e

    def save(self, model_dir: str | Path) -> None:
        data = self.model_dump(mode="json")
        (Path(model_dir) / SORTED_CONFIG_FILE).write_text(json.dumps(data, indent=1) + "\n")


class SortedProposerFactory(NestedProposerFactory):
    """`sorted`: a directory written by `tools.train_sorted` (HF Llama + `sorted.json`)."""

    method = "sorted"

    def __init__(self, config: DrafterConfig, matmul_dtype: str | None = None) -> None:
        self.sorted_config = SortedExitsConfig.load(config.model_dir)
        hash_ = tokenizer_hash(config.model_dir)
        saved = self.sorted_config.tokenizer_hash
        if saved is not None and saved != hash_:
            raise ValueError(
                f"{config.model_dir}: tokenizer files (hash {hash_}) differ from "
                f"the ones the drafter was trained with (sorted.json: {saved})"
            )
        model = load_model(config)
        matmul_dtype = matmul_dtype or self.sorted_config.matmul_dtype
        drafter = NestedDrafter(model, self.sorted_config.exits, DTYPES[matmul_dtype])
        del model  # the drafter keeps its own packed copies of the weights
        super().__init__(config, drafter, hash_, self.sorted_config.thresholds)
