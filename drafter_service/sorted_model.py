"""S2D nested ("sorted") drafter: one Llama whose first n layers form a sub-model per exit.

For each configured exit n (e.g. `[1, 2, 3]`), layers `0..n-1` + the shared final norm +
the shared (tied) LM head form a complete causal LM. Sorted training (`tools.train_sorted`)
makes every one of them a usable drafter; at draft time each token runs layer by layer and
leaves at the shallowest exit whose confidence clears that exit's threshold.

Exit rule (documented, tested): at exit n, confidence = the top probability of
softmax(logits_n / T), with T the session's temperature (T = 1 for greedy sessions, i.e.
the raw softmax). The token exits at the first exit n with `confidence >= threshold[n]`;
the deepest exit always emits. So threshold 0 always exits there, a threshold > 1 never
does, and "fixed exit n" is thresholds `{e: inf for e < n, n: 0}` (deeper layers not run).

KV scheme: **lazy fill** (not state propagation). Every position keeps the residual stream
after the deepest layer computed for it (`hidden[p]`, depth d_p) and each layer l knows how
far its K/V is filled (`filled[l]`; d_p = #{l : filled[l] > p}). When a token must go
through layer l, that layer first runs, in the same batched call, over every pending
position `filled[l]..p` (earlier tokens that exited before l, and context tokens never
processed). Why lazy fill rather than copying the exit hidden state forward (CALM/LayerSkip
state propagation):
  - exact: the K/V of every layer is what the full model computes, so each exit's logits are
    exactly the truncated model's (what sorted training optimises), and a draft is a pure
    function of (context, thresholds, sampling draws): the incremental cache proposes what a
    from-scratch run proposes, with no dependence on earlier exit decisions;
  - cheap here: the pending tokens ride along in the one layer call the deeper token makes
    anyway (a [T, hidden] matmul costs about the same as [1, hidden] on CPU for small T), and
    positions that are later rejected (or never reach a deeper token) are never filled;
  - the prompt is "prefilled" by the same mechanism: context tokens are only embedded, and
    each layer processes them when the first token needs that layer.

The forward is our own, over the HF module weights (fused QKV and gate/up matrices,
precomputed RoPE tables, a per-session preallocated cache written by position as in
gpt-fast's `KVCache`, so rollback is just lowering `filled`): HF's generic forward spends
most of a one-token step on mask/cache bookkeeping for models this small. The step runs
several sessions at once: rows of every session that need layer l are concatenated for the
matmuls; only RoPE, the cache write and attention run per session.

Training (`tools.train_sorted`) runs HF's decoder layers over full sequences instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.sampling import logits_to_probs, sample_from_probs

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

    from shared.sampling import SamplingParams

SORTED_CONFIG_FILE = "sorted.json"
NEVER = math.inf  # a threshold no confidence clears
MAX_SMALL_ROWS = 4  # matmuls of more rows run in the activation dtype (see SortedDrafter)


# --------------------------------------------------------------------------- config


def check_exits(value: list[int]) -> list[int]:
    """Exit depths must be increasing positive layer counts (shared by every exits field)."""
    if value[0] < 1 or any(b <= a for a, b in zip(value, value[1:])):
        raise ValueError(f"exits must be increasing positive layer counts, got {value}")
    return value


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


def thresholds_list(exits: Sequence[int], thresholds: dict[int, float]) -> list[float]:
    """Per-exit thresholds aligned with `exits`; missing = never; the deepest is always 0."""
    for e in thresholds:
        if e not in exits:
            raise ValueError(f"threshold for exit {e}, but the exits are {list(exits)}")
    out = [float(thresholds.get(e, NEVER)) for e in exits]
    out[-1] = 0.0
    return out


def fixed_exit_thresholds(exits: Sequence[int], exit_layer: int) -> dict[int, float]:
    """Thresholds that make every token exit at `exit_layer` (deeper layers never run)."""
    if exit_layer not in exits:
        raise ValueError(f"fixed exit {exit_layer} is not one of the exits {list(exits)}")
    return {e: (0.0 if e == exit_layer else NEVER) for e in exits if e <= exit_layer}


def choose_exit(confidences: Sequence[float], thresholds: Sequence[float]) -> int:
    """Index of the exit that emits: the first with confidence >= threshold, else the last.

    Pure reference of the rule the batched step applies exit by exit.
    """
    assert len(confidences) == len(thresholds)
    for i, (c, t) in enumerate(zip(confidences, thresholds)):
        if c >= t:
            return i
    return len(thresholds) - 1


def exit_confidence(
    logits: torch.Tensor,  # [..., vocab_size]
    temperature: float,
) -> torch.Tensor:  # [...]
    """Top probability of softmax(logits / T) (T = 1 for greedy: the raw softmax)."""
    scale = 1.0 / temperature if temperature > 0 else 1.0
    # max softmax = 1 / sum(exp(scale * (l - max l)))
    m = logits.max(-1, keepdim=True).values
    return 1.0 / torch.exp((logits - m) * scale).sum(-1)


# --------------------------------------------------------------------------- inference state


@dataclass(slots=True)
class SortedKVState:
    """One session's cache, written by position (rollback = lowering `filled`)."""

    k: torch.Tensor  # [num_layers, num_kv_heads, capacity, head_dim], RoPE applied
    v: torch.Tensor  # [num_layers, num_kv_heads, capacity, head_dim]
    hidden: torch.Tensor  # [capacity, hidden_size] residual after depth(p) layers
    filled: list[int]  # [num_layers]: layer l's K/V is valid for positions [0, filled[l])
    token_ids: list[int] = field(default_factory=list)  # tokens at positions [0, len)

    @property
    def capacity(self) -> int:
        return self.hidden.shape[0]

    def depth(self, position: int) -> int:
        return sum(1 for f in self.filled if f > position)


@dataclass(slots=True)
class DraftLane:
    """One session's share of a (batched) draft call; the step fills the outputs."""

    state: SortedKVState
    k: int  # tokens to draft
    thresholds: list[float]  # [num_exits] aligned with the exits (deepest = 0)
    sampling: SamplingParams
    generator: torch.Generator | None = None
    # outputs
    token_ids: list[int] = field(default_factory=list)  # [<= k]
    draft_probs: list[torch.Tensor] = field(default_factory=list)  # sampled only: [vocab_size]
    exit_layers: list[int] = field(default_factory=list)  # [<= k] exit depth of each token


@dataclass(slots=True)
class _Mat:
    """A weight matrix for `SortedDrafter._mm`: `small` in matmul_dtype for calls of a few
    rows (bandwidth-bound), `big` = the same values upcast to the activation dtype for
    calls of many rows (compute-bound), or None when the dtypes agree."""

    small: torch.Tensor  # [out, in] matmul_dtype
    big: torch.Tensor | None  # [out, in] activation dtype, == small exactly


@dataclass(slots=True)
class _LayerWeights:
    """One layer, packed for few ops: the RMSNorm weights are folded into the matmul that
    follows each norm (W @ (w * n) == (W * w) @ n), q is pre-scaled by head_dim**-0.5
    (RoPE is linear, so it commutes), QKV and gate/up are single matrices."""

    wqkv: _Mat  # [(num_heads + 2 * num_kv_heads) * head_dim, hidden]
    wo: _Mat  # [hidden, num_heads * head_dim]
    wgu: _Mat  # [2 * intermediate, hidden]
    wdown: _Mat  # [hidden, intermediate]


class SortedDrafter:
    """Lean incremental forward over a (truncated) HF Llama with exits; no autograd.

    Weights are copied out of the HF modules once (fused QKV and gate/up); the HF model is
    not used afterwards. Not thread-safe across calls sharing a state.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        exits: Sequence[int],
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        """`matmul_dtype` (default: the model's dtype) is the dtype the projection and head
        weights are kept in; activations, norms and the KV cache stay in the model's dtype.
        NOTE: a one-token step is bound by reading the weights from memory (the 3-layer
        demo drafter is ~19 MB in fp32, beyond the L2 and the shared L3 share here). Measured
        in the draft loop on this CPU (1 thread, one-row matmul): fp16 54 us, bf16 108 us,
        fp32 152 us; but CPU fp16 kernels collapse beyond a few rows (120-row prefill: fp16
        66 ms vs fp32 15 ms for a token's 13 matmuls). So calls of more than
        `MAX_SMALL_ROWS` rows (prefill, lazy fill after early exits, batched sessions) use
        fp32 over the exactly upcast weights with fp16-rounded inputs and outputs: the same
        numbers as the fp16 kernel (which accumulates in fp32) up to accumulation order
        (measured: 99.9 % bit-equal, the rest 1 fp16 ulp). Versus fp32 weights the logits
        move by ~1e-3, which only affects acceptance, never losslessness."""
        cfg = model.config
        self.exits = list(exits)
        if self.exits[-1] > cfg.num_hidden_layers:
            raise ValueError(
                f"deepest exit {self.exits[-1]} > the model's {cfg.num_hidden_layers} layers"
            )
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise ValueError("biased Llama projections are not supported by the lean forward")
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (silu only)")
        self.num_layers = self.exits[-1]
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.intermediate = cfg.intermediate_size
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.max_positions = cfg.max_position_embeddings
        inner = model.model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.matmul_dtype = matmul_dtype or p.dtype
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach().clone()  # [vocab, hidden]
            # [vocab, hidden]: the (tied) head with the final norm's weight folded in
            head = model.lm_head.weight.detach().float() * inner.norm.weight.detach().float()
            self.head = self._mat(head)
            self.layers = [self._pack(layer) for layer in inner.layers[: self.num_layers]]
            pos = torch.arange(self.max_positions, device=self.device).unsqueeze(0)
            cos, sin = inner.rotary_emb(self.embed[:1].unsqueeze(0), pos)
        half = self.head_dim // 2
        self.cos = cos[0].to(self.dtype).unsqueeze(1)  # [max_positions, 1, head_dim]
        # rotate_half(x) * sin == x[..., perm] * signed_sin (one gather instead of a cat)
        sin = sin[0].to(self.dtype).clone()
        sin[:, :half] = -sin[:, :half]
        self.sin_signed = sin.unsqueeze(1)  # [max_positions, 1, head_dim]
        self.rot_perm = torch.cat([torch.arange(half, self.head_dim), torch.arange(0, half)]).to(
            self.device
        )
        self.exit_index = {e: i for i, e in enumerate(self.exits)}

    def _pack(self, layer) -> _LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        ln1 = layer.input_layernorm.weight.detach().float()
        ln2 = layer.post_attention_layernorm.weight.detach().float()
        q = attn.q_proj.weight.detach().float() * self.head_dim**-0.5
        qkv = torch.cat([q, attn.k_proj.weight.float(), attn.v_proj.weight.float()]) * ln1
        gu = torch.cat([mlp.gate_proj.weight.float(), mlp.up_proj.weight.float()]) * ln2
        return _LayerWeights(
            wqkv=self._mat(qkv),
            wo=self._mat(attn.o_proj.weight.detach().float()),
            wgu=self._mat(gu),
            wdown=self._mat(mlp.down_proj.weight.detach().float()),
        )

    def _mat(self, w: torch.Tensor) -> _Mat:  # w: [out, in] float32
        small = w.to(self.matmul_dtype).contiguous()
        big = None if self.matmul_dtype == self.dtype else small.to(self.dtype)
        return _Mat(small=small, big=big)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # [rows, hidden], weight folded away
        return F.rms_norm(x, (self.hidden_size,), None, self.eps)

    def _mm(
        self,
        x: torch.Tensor,  # [rows, in] activation dtype
        w: _Mat,
    ) -> torch.Tensor:  # [rows, out] activation dtype
        if w.big is None:
            return F.linear(x, w.small)
        low = w.small.dtype
        if x.shape[0] <= MAX_SMALL_ROWS:
            return F.linear(x.to(low), w.small).to(x.dtype)
        # the small kernel's numbers: low-precision inputs and outputs, wide accumulation
        return F.linear(x.to(low).to(x.dtype), w.big).to(low).to(x.dtype)

    # ------------------------------------------------------------------ state

    def new_state(self, capacity: int = 256) -> SortedKVState:
        capacity = max(1, min(capacity, self.max_positions))
        shape = (self.num_layers, self.num_kv_heads, capacity, self.head_dim)
        return SortedKVState(
            k=torch.zeros(shape, dtype=self.dtype, device=self.device),
            v=torch.zeros(shape, dtype=self.dtype, device=self.device),
            hidden=torch.zeros(capacity, self.hidden_size, dtype=self.dtype, device=self.device),
            filled=[0] * self.num_layers,
        )

    def _reserve(self, state: SortedKVState, length: int) -> None:
        """Grow the buffers (doubling, capped at max positions) to hold `length` positions."""
        if length <= state.capacity:
            return
        assert length <= self.max_positions, (length, self.max_positions)
        cap = min(max(length, 2 * state.capacity), self.max_positions)
        n = len(state.token_ids)
        new = self.new_state(cap)
        new.k[:, :, : state.capacity] = state.k
        new.v[:, :, : state.capacity] = state.v
        new.hidden[:n] = state.hidden[:n]
        state.k, state.v, state.hidden = new.k, new.v, new.hidden

    def reconcile(self, state: SortedKVState, context_ids: Sequence[int], keep: int) -> None:
        """Keep positions [0, keep) (a common prefix of cache and context), embed the rest.

        Callers pass keep <= len(context_ids) - 1: the last context token is always
        re-embedded, because its residual at a shallow exit may have been overwritten by
        a deeper pass and the next draft token is decided from it.
        """
        n = len(context_ids)
        assert 0 <= keep < n, (keep, n)
        del state.token_ids[keep:]
        state.filled = [min(f, keep) for f in state.filled]
        self._reserve(state, n)
        tail = torch.as_tensor(context_ids[keep:], dtype=torch.long, device=self.device)
        state.hidden[keep:n] = self.embed[tail]
        state.token_ids.extend(context_ids[keep:])

    # ------------------------------------------------------------------ forward

    def _run_layer(
        self,
        li: int,
        segments: list[tuple[SortedKVState, int, int]],  # (state, start, end): rows [start, end)
    ) -> None:
        """Layer `li` over each segment's rows; writes K/V and the residual back by position."""
        w = self.layers[li]
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        group = nh // nkv
        if len(segments) == 1:
            st, s, e = segments[0]
            x = st.hidden[s:e]  # [rows, hidden]
            cos, sin = self.cos[s:e], self.sin_signed[s:e]  # [rows, 1, hd]
        else:
            x = torch.cat([st.hidden[s:e] for st, s, e in segments])
            pos = torch.cat([torch.arange(s, e) for _, s, e in segments]).to(self.device)
            cos, sin = self.cos[pos], self.sin_signed[pos]
        rows = x.shape[0]
        qkv = self._mm(self._norm(x), w.wqkv)  # [rows, (nh + 2 nkv) hd], q pre-scaled
        qk = qkv[:, : (nh + nkv) * hd].view(rows, nh + nkv, hd)
        qk = qk * cos + qk[..., self.rot_perm] * sin  # RoPE on q and k at once
        v = qkv[:, (nh + nkv) * hd :].view(rows, nkv, hd)
        outs = []
        off = 0
        for st, s, e in segments:
            t = e - s
            q = qk[off : off + t, :nh]  # [t, nh, hd]
            st.k[li, :, s:e] = qk[off : off + t, nh:].transpose(0, 1)
            st.v[li, :, s:e] = v[off : off + t].transpose(0, 1)
            off += t
            keys, values = st.k[li, :, :e], st.v[li, :, :e]  # [nkv, e, hd]
            # heads g*j .. g*j+g-1 share kv head j (HF repeat_kv): fold them into the rows
            qh = q.transpose(0, 1).reshape(nkv, group * t, hd)
            scores = torch.bmm(qh, keys.transpose(1, 2))  # [nkv, group t, e]
            if t > 1:
                qpos = torch.arange(s, e, device=self.device).unsqueeze(1)  # [t, 1]
                future = torch.arange(e, device=self.device).unsqueeze(0) > qpos  # [t, e]
                scores = scores.masked_fill(future.repeat(group, 1), float("-inf"))
            o = torch.bmm(torch.softmax(scores, dim=-1), values)  # [nkv, group t, hd]
            outs.append(o.view(nh, t, hd).transpose(0, 1).reshape(t, nh * hd))
        a = outs[0] if len(outs) == 1 else torch.cat(outs)  # [rows, nh hd]
        x = x + self._mm(a, w.wo)
        gate, up = self._mm(self._norm(x), w.wgu).split(self.intermediate, dim=-1)
        x = x + self._mm(F.silu(gate) * up, w.wdown)
        off = 0
        for st, s, e in segments:
            st.hidden[s:e] = x[off : off + e - s]
            off += e - s
            st.filled[li] = e

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:  # rows: [b, hidden] -> [b, vocab]
        return self._mm(self._norm(rows), self.head)

    def exit_logits_last(self, state: SortedKVState) -> list[torch.Tensor]:
        """Every exit's logits for the last position of `state` (runs all layers; for tests
        and calibration) of a state fresh from `reconcile`. Returns len(exits) x [vocab_size]."""
        p = len(state.token_ids) - 1
        assert state.depth(p) == 0, "the last position was already run; reconcile first"
        out = []
        for li in range(self.num_layers):
            if state.filled[li] <= p:
                self._run_layer(li, [(state, state.filled[li], p + 1)])
            if li + 1 in self.exit_index:
                out.append(self._logits(state.hidden[p : p + 1])[0])
        return out

    def draft(self, lanes: list[DraftLane]) -> None:
        """Draft `lane.k` tokens for every lane (each reconciled first), all lanes stepping
        together. Fills each lane's token_ids / draft_probs / exit_layers."""
        for lane in lanes:
            n = len(lane.state.token_ids)
            assert n >= 1, "reconcile the state with a non-empty context first"
            assert len(lane.thresholds) == len(self.exits)
            lane.k = min(lane.k, self.max_positions - n)
            self._reserve(lane.state, n + lane.k)
        temps = [
            lane.sampling.temperature if not lane.sampling.greedy else 1.0 for lane in lanes
        ]
        all_raw = all(t == 1.0 for t in temps)
        while True:
            pending = [i for i, lane in enumerate(lanes) if len(lane.token_ids) < lane.k]
            if not pending:
                return
            ei = 0
            for li in range(self.num_layers):
                segs = []
                for i in pending:
                    st = lanes[i].state
                    segs.append((st, st.filled[li], len(st.token_ids)))
                self._run_layer(li, segs)
                if li + 1 != self.exits[ei]:
                    continue
                # exit `ei`: lanes with threshold <= 1 may leave here
                testing = [i for i in pending if lanes[i].thresholds[ei] <= 1.0]
                if testing:
                    if len(testing) == 1:
                        st = lanes[testing[0]].state
                        p = len(st.token_ids) - 1
                        rows = st.hidden[p : p + 1]
                    else:
                        rows = torch.stack(
                            [lanes[i].state.hidden[len(lanes[i].state.token_ids) - 1]
                             for i in testing]
                        )
                    logits = self._logits(rows)  # [b, vocab]
                    if all(lanes[i].thresholds[ei] <= 0.0 for i in testing):
                        leave = testing
                    else:
                        scaled = logits
                        if not all_raw:
                            temp = torch.tensor([temps[i] for i in testing], dtype=logits.dtype)
                            scaled = logits / temp.unsqueeze(1)
                        # host sync: one per exit for the whole batch
                        conf = torch.softmax(scaled, dim=-1).amax(dim=-1).tolist()
                        leave = [
                            i for j, i in enumerate(testing) if conf[j] >= lanes[i].thresholds[ei]
                        ]
                    if leave:
                        if len(leave) < len(testing):
                            logits = logits[[testing.index(i) for i in leave]]
                        self._emit([lanes[i] for i in leave], logits, self.exits[ei])
                        pending = [i for i in pending if i not in leave]
                ei += 1
                if not pending:
                    break

    def _emit(
        self,
        lanes: list[DraftLane],
        logits: torch.Tensor,  # [len(lanes), vocab_size], the exit's logits of each lane
        exit_layer: int,
    ) -> None:
        """Pick each lane's token at this exit (argmax, or a draw from q) and append it."""
        greedy_rows = [r for r, lane in enumerate(lanes) if lane.sampling.greedy]
        # one host sync per exit for the greedy lanes
        greedy_tokens = logits[greedy_rows].argmax(-1).tolist() if greedy_rows else []
        gi = 0
        for r, lane in enumerate(lanes):
            if lane.sampling.greedy:
                token = greedy_tokens[gi]
                gi += 1
            else:
                q = logits_to_probs(logits[r], lane.sampling)  # [vocab_size]
                token = int(sample_from_probs(q, lane.generator))
                lane.draft_probs.append(q)
            lane.token_ids.append(token)
            lane.exit_layers.append(exit_layer)
            st = lane.state
            p = len(st.token_ids)
            st.hidden[p] = self.embed[token]
            st.token_ids.append(token)

