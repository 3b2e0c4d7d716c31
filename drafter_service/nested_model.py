"""Nested drafter: one Llama whose first n layers form a sub-model per exit.

For each configured exit n (e.g. `[1, 2, 3]`), layers `0..n-1` + the shared final norm +
the shared (tied) LM head form a complete causal LM. S2D's sorted training
(`tools.train_sorted`) makes every one of them a usable drafter (`sorted`); a plain draft
model (`draft_model`) is the one-exit case (its last layer). At draft time each token runs
layer by layer and leaves at the shallowest exit whose confidence clears that exit's
threshold.

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

The layers run on the project's one lean Llama forward (`shared.llama`: packed weights, a
per-session cache written by position, so rollback is just lowering `filled`). The step
runs several sessions at once: rows of every session that need layer l are concatenated
for the matmuls; only RoPE, the cache write and attention run per session.

Training (`tools.train_sorted`) runs HF's decoder layers over full sequences instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING

import torch

from shared.llama import LlamaWeights, Segment
from shared.sampling import logits_to_probs, position_noise, sample_from_probs

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

    from shared.types import SamplingParams

NEVER = math.inf  # a threshold no confidence clears


# --------------------------------------------------------------------------- exits


def check_exits(value: list[int]) -> list[int]:
    """Exit depths must be increasing positive layer counts (shared by every exits field)."""
    if value[0] < 1 or any(b <= a for a, b in pairwise(value)):
        raise ValueError(f"exits must be increasing positive layer counts, got {value}")
    return value


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
class NestedState:
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

    state: NestedState
    k: int  # tokens to draft
    thresholds: list[float]  # [num_exits] aligned with the exits (deepest = 0)
    sampling: SamplingParams
    # runner-up children to keep per draft token (card's tree; greedy and seeded lanes only)
    num_alternatives: int = 0
    # outputs
    token_ids: list[int] = field(default_factory=list)  # [<= k]
    draft_probs: list[torch.Tensor] = field(default_factory=list)  # sampled only: [vocab_size]
    exit_layers: list[int] = field(default_factory=list)  # [<= k] exit depth of each token
    token_probs: list[float] = field(default_factory=list)  # [<= k] q of each token (num_alternatives > 0)
    alternatives: list[list[tuple[int, float]]] = field(default_factory=list)  # [<= k] runner-ups (token, q)


class NestedDrafter:
    """Incremental forward over a (truncated) Llama with exits, on `shared.llama`'s packed
    weights (copied out of the HF modules once; the HF model is not used afterwards). A plain
    draft model is the one-exit case (its last layer). Not thread-safe across calls sharing
    a state."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        exits: Sequence[int],
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        """`matmul_dtype` (default: the model's dtype): see `shared.llama.LlamaWeights`; fp16
        weights move the logits by ~1e-3, which only affects acceptance, never the output."""
        self.exits = list(exits)
        if self.exits[-1] > model.config.num_hidden_layers:
            raise ValueError(
                f"deepest exit {self.exits[-1]} > the model's {model.config.num_hidden_layers} layers"
            )
        self.weights = w = LlamaWeights(model, self.exits[-1], matmul_dtype)
        self.num_layers = w.num_layers
        self.vocab_size = w.vocab_size
        self.max_positions = w.max_positions
        self.device, self.dtype = w.device, w.dtype
        self.embed = w.embed  # [vocab, hidden]
        self.exit_index = {e: i for i, e in enumerate(self.exits)}

    # ------------------------------------------------------------------ state

    def new_state(self, capacity: int = 256) -> NestedState:
        capacity = max(1, min(capacity, self.max_positions))
        k, v = self.weights.new_kv(capacity)
        hidden = torch.zeros(capacity, self.weights.hidden_size, dtype=self.dtype, device=self.device)
        return NestedState(k=k, v=v, hidden=hidden, filled=[0] * self.num_layers)

    def copy_state(self, state: NestedState) -> NestedState:
        """An independent copy of a state (`card` drafts a branch on it while the original
        keeps the line)."""
        n = len(state.token_ids)
        new = self.new_state(state.capacity)
        new.k[:, :, :n] = state.k[:, :, :n]
        new.v[:, :, :n] = state.v[:, :, :n]
        new.hidden[:n] = state.hidden[:n]
        new.filled, new.token_ids = list(state.filled), list(state.token_ids)
        return new

    def _reserve(self, state: NestedState, length: int) -> None:
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

    def reconcile(self, state: NestedState, context_ids: Sequence[int], keep: int) -> None:
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
        segments: list[tuple[NestedState, int, int]],  # (state, start, end): rows [start, end)
    ) -> None:
        """Layer `li` over each segment's rows (one set of matmuls for all sessions); writes
        K/V and the residual back by position."""
        if len(segments) == 1:
            st, s, e = segments[0]
            x = st.hidden[s:e]  # [rows, hidden]
        else:
            x = torch.cat([st.hidden[s:e] for st, s, e in segments])
        x = self.weights.layer(li, x, [Segment(st.k[li], st.v[li], s, e) for st, s, e in segments])
        off = 0
        for st, s, e in segments:
            st.hidden[s:e] = x[off : off + e - s]
            off += e - s
            st.filled[li] = e

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:  # rows: [b, hidden] -> [b, vocab]
        return self.weights.logits(rows)

    def exit_logits_last(self, state: NestedState) -> list[torch.Tensor]:
        """Every exit's logits for the last position of a state fresh from `reconcile` (runs
        all layers; tests compare them with HF's truncated models). Returns len(exits) x
        [vocab_size]."""
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

    @staticmethod
    def _keep_alternatives(lane: DraftLane, score: torch.Tensor, q: torch.Tensor, token: int) -> None:
        """The lane's q of `token` and its `num_alternatives` runners-up by `score` (one host sync)."""
        top = torch.topk(score, lane.num_alternatives + 1).indices  # [n + 1]
        ids = top.tolist()
        probs = q[torch.cat([top, torch.tensor([token])])].tolist()
        lane.token_probs.append(probs[-1])
        lane.alternatives.append([(t, pr) for t, pr in zip(ids, probs) if t != token][: lane.num_alternatives])

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
                if lane.num_alternatives:
                    # q = the raw softmax; its argmax is `token` (ties: the first, as argmax)
                    q = torch.softmax(logits[r].float(), dim=-1)  # [vocab_size]
                    self._keep_alternatives(lane, q, q, token)
            else:
                q = logits_to_probs(logits[r], lane.sampling)  # [vocab_size]
                if lane.sampling.seed is not None:
                    # the target's own noise at this position (Gumbel-max coupling): the
                    # draft is what the target draws wherever q is close to p, and the
                    # verifier accepts it iff it is (no q needed: one-hot)
                    p = len(lane.state.token_ids)  # the drafted token's position in the sequence
                    noise = position_noise([lane.sampling.seed], [p], q.shape[-1])[0]
                    race = q / noise  # [vocab_size]
                    token = int(torch.argmax(race))
                    if lane.num_alternatives:
                        # the runners-up of the same race: the target's likeliest draws here
                        # when it does not draw `token`
                        self._keep_alternatives(lane, race, q, token)
                else:
                    token = int(sample_from_probs(q))
                    lane.draft_probs.append(q)
            lane.token_ids.append(token)
            lane.exit_layers.append(exit_layer)
            st = lane.state
            p = len(st.token_ids)
            st.hidden[p] = self.embed[token]
            st.token_ids.append(token)

