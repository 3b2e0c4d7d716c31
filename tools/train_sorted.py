"""Sorted (S2D) fine-tuning of a nested drafter, with self-distillation from the targets.

    python -m tools.train_sorted --output-dir models/codelm-sorted --max-minutes 25

Steps:
1. **Initialise** a Llama with `exits[-1]` layers: from a checkpoint (`--init-from DIR`,
   layers `--init-layers`, default the first ones; embeddings, final norm and the tied head
   come along) or from scratch (`--init scratch`, sizes from the options).
2. **Self-distillation data**: every target continues training prompts
   (`../shared/data/train_prompts/code_prompts.jsonl`, never benchmark prompts) with
   batched HF generate, greedy and/or sampled (T = `--temperature`). The token sequences are
   cached under `--cache-dir` (git-ignored), keyed by the generation options.
3. **Sorted loss**: for each exit, the next-token cross-entropy on the sequence plus
   `--kd-weight` × KL(p_target || q_exit) averaged over the targets (their full
   distributions, computed on the fly under no_grad); the loss is the mean over exits.
   Batches are length-bucketed (no cross-example attention, positions start at 0 as at
   draft time).
4. **Save** an HF directory (fp16 safetensors, tokenizer files, `sorted.json` with exits,
   thresholds calibrated on held-out data, and how it was trained) that
   `drafter_service.sorted.SortedProposerFactory` loads.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drafter_service.nested_model import check_exits
from drafter_service.sorted import SortedExitsConfig
from shared.loading import tokenizer_hash
from shared.paths import PROJECT_ROOT, data_dir, models_dir

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------- config


class TrainSortedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    output_dir: Path = Field(..., description="Where the HF-format drafter is written.")
    exits: list[int] = Field([1, 2, 3], min_length=1, description="Exit depths, increasing.")
    init: Literal["checkpoint", "scratch"] = Field("checkpoint", description="Initialisation.")
    init_from: Path = Field(
        models_dir() / "codelm-target-s", description="Checkpoint whose layers seed the drafter."
    )
    init_layers: list[int] | None = Field(
        None,
        description="Checkpoint layer indices to copy, one per drafter layer (default: first).",
    )
    scratch_hidden_size: int = Field(256, gt=0, description="Scratch init: hidden size.")
    scratch_intermediate_size: int = Field(704, gt=0, description="Scratch init: MLP size.")
    scratch_num_heads: int = Field(4, gt=0, description="Scratch init: attention heads.")
    scratch_num_kv_heads: int = Field(1, gt=0, description="Scratch init: KV heads.")
    targets: list[Path] = Field(
        [models_dir() / "codelm-target-m", models_dir() / "codelm-target-s"],
        min_length=1,
        description="Target models: generate the data and provide the KD distributions.",
    )
    prompts: Path = Field(
        data_dir() / "train_prompts" / "code_prompts.jsonl", description="Training prompts (jsonl)."
    )
    num_prompts: int = Field(640, gt=0, description="Prompts per target and generation mode.")
    gen_modes: list[Literal["greedy", "sample"]] = Field(
        ["greedy", "sample"], min_length=1, description="How the targets continue the prompts."
    )
    temperature: float = Field(0.8, gt=0, description="Sampling temperature of the 'sample' mode.")
    max_prompt_tokens: int = Field(128, gt=0, description="Prompts keep their last N tokens.")
    max_new_tokens: int = Field(128, gt=0, description="Continuation length per prompt.")
    gen_batch_size: int = Field(96, gt=0, description="Prompts per generate call.")
    cache_dir: Path = Field(PROJECT_ROOT / ".cache" / "sorted_data", description="Data cache.")
    batch_size: int = Field(12, gt=0, description="Sequences per training step.")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor, as a fraction of lr.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the KL-to-targets term.")
    max_minutes: float = Field(25.0, gt=0, description="Training-loop time budget (minutes).")
    max_steps: int | None = Field(None, gt=0, description="Step cap (default: time budget only).")
    num_threads: int = Field(
        1, gt=0, description="torch threads (1: on the shared 2-core box, 2 threads fighting "
        "other jobs ran generate 10x slower)."
    )
    seed: int = Field(0, description="Seed for data order, sampling and init.")
    val_fraction: float = Field(0.03, ge=0, lt=1, description="Held-out share of sequences.")
    calibration_agreement: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Default thresholds: per exit, the lowest confidence above which its "
        "token equals the deepest exit's at least this often on held-out data.",
    )
    matmul_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="Weight dtype of the drafter's lean forward (saved in sorted.json)."
    )
    calibrate_only: bool = Field(
        False,
        description="Skip training: recalibrate the thresholds of the drafter already in "
        "output_dir on the held-out split of the (cached) data and rewrite its sorted.json.",
    )
    eval_humaneval: int = Field(0, ge=0, description="After training, report match rates on "
                                "the first N HumanEval prompts (evaluation only).")

    @field_validator("exits")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        return check_exits(value)

    @model_validator(mode="after")
    def _layers(self) -> TrainSortedConfig:
        if self.init_layers is not None and len(self.init_layers) != self.exits[-1]:
            raise ValueError(
                f"init_layers {self.init_layers} must name {self.exits[-1]} layers (deepest exit)"
            )
        if self.max_prompt_tokens + self.max_new_tokens > 256:
            raise ValueError("the demo models are trained on 256-token windows: "
                             f"{self.max_prompt_tokens} + {self.max_new_tokens} > 256")
        return self


# --------------------------------------------------------------------------- model init


def init_drafter(cfg: TrainSortedConfig):
    """A LlamaForCausalLM with exits[-1] layers, from a checkpoint's layers or from scratch."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    num_layers = cfg.exits[-1]
    torch.manual_seed(cfg.seed)
    if cfg.init == "checkpoint":
        src = AutoModelForCausalLM.from_pretrained(
            str(cfg.init_from), dtype=torch.float32, local_files_only=True
        )
        layers = cfg.init_layers or list(range(num_layers))
        if max(layers) >= src.config.num_hidden_layers:
            raise ValueError(f"init_layers {layers}: {cfg.init_from} has "
                             f"{src.config.num_hidden_layers} layers")
        config = LlamaConfig.from_dict(src.config.to_dict())
        config.num_hidden_layers = num_layers
        model = LlamaForCausalLM(config)
        state = {k: v for k, v in src.state_dict().items() if ".layers." not in k}
        for new_i, old_i in enumerate(layers):
            prefix = f"model.layers.{old_i}."
            for k, v in src.state_dict().items():
                if k.startswith(prefix):
                    state[f"model.layers.{new_i}." + k[len(prefix):]] = v
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embeddings
        assert not missing and not unexpected, (missing, unexpected)
    else:
        ref = LlamaConfig.from_pretrained(str(cfg.targets[0]))
        config = LlamaConfig(
            vocab_size=ref.vocab_size,
            hidden_size=cfg.scratch_hidden_size,
            intermediate_size=cfg.scratch_intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=cfg.scratch_num_heads,
            num_key_value_heads=cfg.scratch_num_kv_heads,
            max_position_embeddings=ref.max_position_embeddings,
            rms_norm_eps=ref.rms_norm_eps,
            tie_word_embeddings=True,
            bos_token_id=ref.bos_token_id,
            eos_token_id=ref.eos_token_id,
            pad_token_id=ref.pad_token_id,
        )
        model = LlamaForCausalLM(config)
    model.tie_weights()
    return model


# --------------------------------------------------------------------------- data


def training_prompt_texts(path: Path, num: int, seed: int) -> list[str]:
    """The `num` prompts a run with `seed` trains on: a seeded shuffle of the file, cut."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        texts = [json.loads(line)["prompt"] for line in f if line.strip()]
    random.Random(seed).shuffle(texts)
    return texts[:num]


def trained_on(drafter_dir: Path) -> set[str]:
    """The prompts a drafter written by this tool was trained on (from its sorted.json's
    training record; empty for a drafter without one), so that defaults are never chosen on
    them: a drafter drafts its own training data better than users' prompts."""
    meta = json.loads((drafter_dir / "sorted.json").read_text()).get("training", {})
    data = meta.get("data")
    if not data:
        return set()
    path = data_dir() / "train_prompts" / data["prompts"]
    return set(training_prompt_texts(path, data["num_prompts"], data.get("seed", 0)))


def load_prompts(path: Path, tokenizer, num: int, max_tokens: int, seed: int) -> list[list[int]]:
    out = []
    for text in training_prompt_texts(path, num, seed):
        ids = tokenizer(text)["input_ids"][-max_tokens:]
        if ids:
            out.append(ids)
    return out


def _data_key(cfg: TrainSortedConfig, target: Path, mode: str) -> str:
    blob = json.dumps(
        [str(target), tokenizer_hash(target), mode, str(cfg.prompts), cfg.num_prompts,
         cfg.temperature, cfg.max_prompt_tokens, cfg.max_new_tokens, cfg.seed],
    ).encode()
    return f"{target.name}-{mode}-{hashlib.sha256(blob).hexdigest()[:12]}"


@torch.inference_mode()
def generate_continuations(
    model, prompts: list[list[int]], mode: str, cfg: TrainSortedConfig, desc: str
) -> list[list[int]]:
    """prompt + continuation (up to and including the first EOS) for every prompt."""
    from tqdm import tqdm

    eos = model.config.eos_token_id
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos
    # similar lengths together: less left padding per generate call
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    gen = torch.Generator().manual_seed(cfg.seed)
    for b in tqdm(range(0, len(order), cfg.gen_batch_size), desc=desc, file=sys.stderr):
        idx = order[b : b + cfg.gen_batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        kwargs: dict = {"do_sample": False}
        if mode == "sample":
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs = {"do_sample": True, "temperature": cfg.temperature, "top_k": 0, "top_p": 1.0}
        seqs = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
            pad_token_id=pad, eos_token_id=eos, **kwargs,
        )
        for r, i in enumerate(idx):
            cont = seqs[r, width:].tolist()
            if eos in cont:
                cont = cont[: cont.index(eos) + 1]
            out[i] = prompts[i] + cont
    return out  # type: ignore[return-value]


def build_data(cfg: TrainSortedConfig, targets: list, tokenizer) -> list[list[int]]:
    """Every (target, mode) continuation set, generated once and cached."""
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(cfg.prompts, tokenizer, cfg.num_prompts, cfg.max_prompt_tokens, cfg.seed)
    data: list[list[int]] = []
    for path, model in zip(cfg.targets, targets):
        for mode in cfg.gen_modes:
            file = cfg.cache_dir / f"{_data_key(cfg, path, mode)}.json"
            if file.is_file():
                seqs = json.loads(file.read_text())
            else:
                seqs = generate_continuations(model, prompts, mode, cfg, f"gen {path.name} {mode}")
                tmp = file.with_suffix(".tmp")
                tmp.write_text(json.dumps(seqs))
                tmp.replace(file)
            print(f"data {path.name} {mode}: {len(seqs)} sequences, "
                  f"{sum(map(len, seqs))} tokens ({file.name})", file=sys.stderr)
            data.extend(seqs)
    return data


def make_batches(seqs: list[list[int]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches of sequence indices, in random order."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), rng.random()))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids [b, t] (right-padded) and the loss mask of next-token targets [b, t - 1]."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s) - 1] = True
    return ids, mask


# --------------------------------------------------------------------------- loss


def sorted_exit_hidden(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,  # [batch, seq]
    exits: Sequence[int],
) -> list[torch.Tensor]:  # len(exits) x [batch, seq, hidden] (after the shared final norm)
    """Full-sequence forward (autograd) returning each exit's normed hidden state.

    `model.lm_head(h)` of the i-th result are exit i's logits. Layers are HF's own (SDPA
    with `attention_mask=None` is causal), so this is the truncated model's computation.
    """
    inner = model.model
    x = inner.embed_tokens(input_ids)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    pos_emb = inner.rotary_emb(x, pos)
    out = []
    for i, layer in enumerate(inner.layers[: exits[-1]]):
        x = layer(x, attention_mask=None, position_embeddings=pos_emb, position_ids=pos)
        if i + 1 in exits:
            out.append(inner.norm(x))
    return out


@torch.no_grad()
def target_log_probs(
    targets: list, ids: torch.Tensor, mask: torch.Tensor  # ids [b, t]; mask [b, t - 1]
) -> list[torch.Tensor]:  # per target: [n, vocab] log p at the masked positions
    return [
        F.log_softmax(t(input_ids=ids).logits[:, :-1][mask].float(), dim=-1) for t in targets
    ]


def sorted_loss(
    model,
    exits: list[int],
    ids: torch.Tensor,  # [b, t]
    mask: torch.Tensor,  # [b, t - 1] positions with a next-token target
    target_logp: list[torch.Tensor],  # per target [n, vocab] (n = mask.sum()); may be empty
    kd_weight: float,
) -> tuple[torch.Tensor, list[float], list[float]]:
    """(loss, CE per exit, KL per exit): mean over exits of CE + kd_weight * mean_t KL(p_t||q)."""
    labels = ids[:, 1:][mask]  # [n]
    total = 0.0
    ces, kls = [], []
    for h in sorted_exit_hidden(model, ids, exits):
        logq = F.log_softmax(model.lm_head(h[:, :-1][mask]).float(), dim=-1)  # [n, vocab]
        ce = F.nll_loss(logq, labels)
        loss = ce
        kl_value = 0.0
        if target_logp and kd_weight > 0:
            kl = sum(
                F.kl_div(logq, logp, log_target=True, reduction="batchmean") for logp in target_logp
            ) / len(target_logp)
            loss = loss + kd_weight * kl
            kl_value = float(kl.detach())
        total = total + loss
        ces.append(float(ce.detach()))
        kls.append(kl_value)
    return total / len(exits), ces, kls


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def exit_predictions(model, exits: list[int], seqs: list[list[int]], batch_size: int = 16):
    """Per sequence: (confidences [len(exits), t-1], argmax [len(exits), t-1])."""
    out = []
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b : b + batch_size]
        ids, _ = collate(chunk, 0)  # right padding: no real position attends to it
        hs = sorted_exit_hidden(model, ids, exits)
        probs = torch.stack([F.softmax(model.lm_head(h[:, :-1]).float(), -1) for h in hs])
        conf, arg = probs.max(-1)  # [exits, b, t - 1]
        for r, s in enumerate(chunk):
            out.append((conf[:, r, : len(s) - 1], arg[:, r, : len(s) - 1]))
    return out


def calibrate_thresholds(
    model, exits: list[int], seqs: list[list[int]], agreement: float
) -> tuple[dict[int, float], dict[str, float]]:
    """Default thresholds: per non-deepest exit, the lowest confidence above which the exit's
    argmax equals the deepest exit's argmax at least `agreement` of the time on `seqs`.

    Agreement with the deepest exit (not with the data) is the criterion because an early
    exit should only skip layers that would not have changed the token: it bounds the
    acceptance lost to early exits by 1 - agreement. Returns (thresholds, held-out stats:
    per-exit match with the data's next token, and the adaptive rule's match and exit mix).
    """
    preds = exit_predictions(model, exits, seqs)
    conf = torch.cat([c for c, _ in preds], dim=1)  # [exits, n]
    arg = torch.cat([a for _, a in preds], dim=1)  # [exits, n]
    labels = torch.cat([torch.tensor(s[1:]) for s in seqs])  # [n]
    stats = {f"val_match_exit{e}": round(float((arg[i] == labels).float().mean()), 4)
             for i, e in enumerate(exits)}
    thresholds: dict[int, float] = {}
    for i, e in enumerate(exits[:-1]):
        c, order = conf[i].sort(descending=True)
        same = (arg[i] == arg[-1])[order].float()
        upper_agreement = same.cumsum(0) / torch.arange(1, len(c) + 1)
        ok = (upper_agreement >= agreement).nonzero()
        # the lowest confidence whose whole upper set still agrees often enough
        thresholds[e] = round(float(c[ok[-1, 0]]), 4) if len(ok) else 1.01
    # the adaptive rule on the same positions
    chosen = torch.full_like(labels, len(exits) - 1)
    for i in reversed(range(len(exits) - 1)):
        chosen = torch.where(conf[i] >= thresholds[exits[i]], i, chosen)
    token = arg.gather(0, chosen.unsqueeze(0))[0]
    stats["val_match_adaptive"] = round(float((token == labels).float().mean()), 4)
    stats["val_adaptive_mean_exit"] = round(
        float(torch.tensor(exits, dtype=torch.float)[chosen].mean()), 3
    )
    return thresholds, stats


def split_data(
    data: list[list[int]], cfg: TrainSortedConfig, rng: random.Random
) -> tuple[list, list]:
    """(held-out, training) sequences: a shuffle by `rng` (seeded: every run splits alike)."""
    data = list(data)
    rng.shuffle(data)
    num_val = int(len(data) * cfg.val_fraction)
    return data[:num_val], data[num_val:]


def recalibrate(cfg: TrainSortedConfig, val: list[list[int]]) -> dict:
    """Rewrite the thresholds of the drafter in cfg.output_dir (training record kept)."""
    from transformers import AutoModelForCausalLM

    saved = SortedExitsConfig.load(cfg.output_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(cfg.output_dir), dtype=torch.float32, local_files_only=True
    ).eval()
    thresholds, stats = calibrate_thresholds(model, saved.exits, val, cfg.calibration_agreement)
    training = dict(saved.training or {})
    training.update(stats)
    training["calibration"] = {
        "command": "python -m tools.train_sorted " + " ".join(sys.argv[1:]),
        "agreement": cfg.calibration_agreement,
        "num_val_sequences": len(val),
    }
    update = {"thresholds": thresholds, "training": training, "matmul_dtype": cfg.matmul_dtype}
    saved.model_copy(update=update).save(cfg.output_dir)
    return {"thresholds": thresholds, **stats}


def humaneval_match(model, exits, targets, tokenizer, num: int, new_tokens: int = 64):
    """Greedy-token match rate of each exit on each target's greedy continuations of the
    first `num` HumanEval prompts that fit in 256 tokens (evaluation only)."""
    path = data_dir() / "humaneval" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        prompts = [tokenizer(json.loads(line)["prompt"])["input_ids"] for line in f]
    prompts = [p for p in prompts if len(p) + new_tokens <= 256][:num]
    result = {}
    for tpath, target in zip([Path(t) for t in targets[0]], targets[1]):
        seqs = []
        with torch.inference_mode():
            for p in prompts:
                out = target.generate(torch.tensor([p]), max_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0)
                seqs.append(out[0].tolist())
        preds = exit_predictions(model, exits, seqs)
        for i, e in enumerate(exits):
            hit = tot = 0
            for (_, arg), p, s in zip(preds, prompts, seqs):
                gen = torch.tensor(s[len(p):])
                hit += int((arg[i, len(p) - 1 :] == gen).sum())
                tot += len(gen)
            result[f"{tpath.name}/exit{e}"] = round(hit / max(tot, 1), 4)
    return result


# --------------------------------------------------------------------------- main


def save_drafter(model, cfg: TrainSortedConfig, thresholds: dict[int, float], info: dict) -> None:
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    model.to(torch.float32)
    src = cfg.init_from if cfg.init == "checkpoint" else cfg.targets[0]
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy(Path(src) / name, out / name)
    SortedExitsConfig(
        exits=cfg.exits, thresholds=thresholds, tokenizer_hash=tokenizer_hash(out),
        matmul_dtype=cfg.matmul_dtype, training=info,
    ).save(out)


def train(cfg: TrainSortedConfig) -> dict:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cfg.num_threads)
    t_start = time.time()
    hashes = {str(t): tokenizer_hash(t) for t in cfg.targets}
    if len(set(hashes.values())) != 1:
        raise ValueError(f"targets have different tokenizers: {hashes}")
    if cfg.init == "checkpoint" and tokenizer_hash(cfg.init_from) not in hashes.values():
        raise ValueError(f"init checkpoint {cfg.init_from} has another tokenizer than the targets")
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.targets[0]), local_files_only=True)
    targets = [
        AutoModelForCausalLM.from_pretrained(str(t), dtype=torch.float32, local_files_only=True)
        for t in cfg.targets
    ]
    for t in targets:
        t.eval().requires_grad_(False)
    data = build_data(cfg, targets, tokenizer)
    t_data = time.time() - t_start
    rng = random.Random(cfg.seed)  # one stream: the split, then the batch order
    val, train_seqs = split_data(data, cfg, rng)
    if cfg.calibrate_only:
        result = recalibrate(cfg, val)
        print(json.dumps(result, indent=1))
        return result

    model = init_drafter(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))
    budget_s = cfg.max_minutes * 60
    pad = tokenizer.pad_token_id or 0
    step = 0
    t0 = time.time()
    losses_ema: list[float] | None = None
    bar = tqdm(total=int(budget_s), unit="s", desc="sorted", file=sys.stderr,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}")
    epoch = 0
    done = False
    while not done:
        for batch in make_batches(train_seqs, cfg.batch_size, rng):
            elapsed = time.time() - t0
            if elapsed >= budget_s or (cfg.max_steps and step >= cfg.max_steps):
                done = True
                break
            if step < cfg.warmup_steps:
                lr = cfg.lr * (step + 1) / cfg.warmup_steps
            else:
                # cosine over steps when capped, else over the time budget (ends with the time)
                frac = (step / cfg.max_steps) if cfg.max_steps else (elapsed / budget_s)
                cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
                lr = cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)
            for group in opt.param_groups:
                group["lr"] = lr
            ids, mask = collate([train_seqs[i] for i in batch], pad)
            logp = target_log_probs(targets, ids, mask) if cfg.kd_weight > 0 else []
            loss, ces, kls = sorted_loss(model, cfg.exits, ids, mask, logp, cfg.kd_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            cur = ces + kls
            if losses_ema is None:
                losses_ema = cur
            losses_ema = [0.9 * a + 0.1 * b for a, b in zip(losses_ema, cur)]
            n = len(cfg.exits)
            bar.set_postfix_str(
                f"step {step} ep {epoch} lr {lr:.1e} "
                + " ".join(f"ce{e}={losses_ema[i]:.3f}" for i, e in enumerate(cfg.exits))
                + " " + " ".join(f"kl{e}={losses_ema[n + i]:.3f}" for i, e in enumerate(cfg.exits)),
                refresh=False,
            )
            bar.n = min(int(time.time() - t0), int(budget_s))
            bar.refresh()
        epoch += 1
    bar.close()
    t_train = time.time() - t0
    model.eval()

    thresholds, rates = ({}, {})
    if val:
        thresholds, rates = calibrate_thresholds(model, cfg.exits, val, cfg.calibration_agreement)
    info = {
        "command": "python -m tools.train_sorted " + " ".join(sys.argv[1:]),
        "init": cfg.init if cfg.init == "scratch" else f"{Path(cfg.init_from).name} layers "
        f"{cfg.init_layers or list(range(cfg.exits[-1]))}",
        "targets": [Path(t).name for t in cfg.targets],
        "data": {"prompts": str(Path(cfg.prompts).name), "num_prompts": cfg.num_prompts, "seed": cfg.seed,
                 "gen_modes": cfg.gen_modes, "temperature": cfg.temperature,
                 "max_prompt_tokens": cfg.max_prompt_tokens, "max_new_tokens": cfg.max_new_tokens,
                 "num_sequences": len(data), "num_tokens": sum(map(len, data)),
                 "num_val_sequences": len(val)},
        "steps": step, "epochs_started": epoch, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "kd_weight": cfg.kd_weight,
        "final_ce_ema": dict(zip(map(str, cfg.exits), (losses_ema or [])[: len(cfg.exits)])),
        "final_kl_ema": dict(zip(map(str, cfg.exits), (losses_ema or [])[len(cfg.exits) :])),
        "data_minutes": round(t_data / 60, 1), "train_minutes": round(t_train / 60, 1),
        **rates,
    }
    if cfg.eval_humaneval:
        info["humaneval_match"] = humaneval_match(
            model, cfg.exits, (cfg.targets, targets), tokenizer, cfg.eval_humaneval
        )
    save_drafter(model, cfg, thresholds, info)
    info["thresholds"] = thresholds
    print(json.dumps(info, indent=1))
    return info


def parse_args(argv: list[str] | None = None) -> TrainSortedConfig:
    parser = argparse.ArgumentParser(
        prog="python -m tools.train_sorted", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, f in TrainSortedConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = f.annotation
        kwargs: dict = {"help": f.description, "default": None if f.is_required() else f.default}
        if f.is_required():
            kwargs["required"] = True
        if ann in (list[int], list[int] | None):
            kwargs.update(type=lambda s: [int(x) for x in s.split(",")], metavar="N,N,...")
        elif ann == list[Path]:
            kwargs.update(type=lambda s: [Path(x) for x in s.split(",")], metavar="DIR,DIR,...")
        elif name == "gen_modes":
            kwargs.update(type=lambda s: s.split(","), metavar="greedy,sample")
        elif name == "init":
            kwargs.update(choices=["checkpoint", "scratch"])
        elif name == "matmul_dtype":
            kwargs.update(choices=["float32", "float16", "bfloat16"])
        elif ann is bool:
            kwargs.update(action="store_true", default=None)
        elif ann in (int, int | None):
            kwargs["type"] = int
        elif ann in (float, float | None):
            kwargs["type"] = float
        elif ann == Path:
            kwargs["type"] = Path
        parser.add_argument(flag, **kwargs)
    args = vars(parser.parse_args(argv))
    try:
        return TrainSortedConfig(**{k: v for k, v in args.items() if v is not None})
    except ValueError as e:
        parser.error(str(e))
        raise


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
