"""The one lean Llama-architecture forward: packed weights, RoPE tables, a KV cache written by
position, attention over several sessions' rows in one set of matmuls; no autograd.

HF's generic forward spends most of a one-token step on mask and cache bookkeeping for
models this small, so drafters (`drafter_service.nested_model.NestedDrafter`: nested exits,
lazy fill, cross-session batches) and the target path (`LlamaForward`: prefill, verify,
rollback) run on these pieces instead. Weights are copied out of an HF `LlamaForCausalLM`
once and packed for few ops:

- the RMSNorm weights are folded into the matmul that follows each norm
  (W @ (w * n) == (W * w) @ n) and the final norm into the LM head;
- q is pre-scaled by head_dim**-0.5 (RoPE is linear, so it commutes);
- QKV and gate/up are single matrices; RoPE is one gather and two multiplies.

`matmul_dtype` (drafters: fp16) keeps the projection weights in a narrower dtype than the
activations: a one-row step is bound by reading weights from memory. The target path keeps
the checkpoint's dtype; its logits match HF's within 1e-4 (tests/shared/test_llama.py).

KV caches (gpt-fast's `KVCache`) are preallocated and written by position, so a rollback only
lowers a length: per drafter session ([layers, kv_heads, capacity, head_dim], `Segment`) and,
for the batched target engine, one `SlotCache` of [layers, slots, kv_heads, capacity,
head_dim] whose rows `LlamaForward.step` feeds all at once (ragged `RowFeed`s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from shared.draft_tree import depths_of, is_chain

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

MAX_SMALL_ROWS = 4  # matmuls of more rows run in the activation dtype (see LlamaWeights.mm)


# fp32 matrices on CPU are kept in three layouts, each for the calls it runs fastest
# (`LlamaWeights.mm`): one row (a single stream's decode step) runs MKL over the weight stored
# [in, out]; 2 to `MKL_MAX_ROWS` rows (a single stream's verify feed, a few decoding rows)
# run MKL over [out, in]; more rows run oneDNN's linear over the weight reordered once into
# its blocked layout (what torch's own compiler uses on CPU). Three copies of the weights:
# this CPU engine serves demo-size models, whose step time is the weights streamed from
# cache. Measured on this machine's CPU, one thread, whole target-m steps in blocks of 20
# per variant: one row over [in, out] against oneDNN 1.5x (3.95 vs 5.9 ms); one row of 2 / 3
# / 4 tokens over [out, in] against [in, out] 1.26-1.41 / 1.15-1.18 / 1.17-1.22x (over
# [in, out] MKL ran 2 rows at nearly twice one row's time), 2 rows of 1 token 1.20-1.29x,
# one row over [out, in] 0.82-0.96x; from 6 tokens on MKL lost to oneDNN (0.87-0.95x).
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
MKL_MAX_ROWS = 4


def onednn_rows(n: int) -> int:
    """Rows a oneDNN call runs for `n` rows: exact up to 8, then padded to a multiple of 16
    (of 128 from 256 up). oneDNN keeps a cache of kernels per shape (1024 entries); a batched
    verifier sees a new row count nearly every step, and with every count its own kernel a
    long-running replica slowed to a third (`none` at 16 concurrent, target-m: 573 tok/s in
    a load test's first pass, 171-271 in the next three)."""
    if n <= 8:
        return n
    step = 16 if n < 256 else 128
    return -(-n // step) * step


@dataclass(slots=True)
class PackedMatrix:
    """A weight matrix: `small` in matmul_dtype for calls of a few rows (bandwidth-bound),
    `big` = the same values upcast to the activation dtype for calls of many rows
    (compute-bound), or None when the dtypes agree. fp32 on CPU (`big` None) keeps three
    layouts (see `ONEDNN`): `small` stored [in, out] for one row, `few_rows` [out, in] for 2
    to `MKL_MAX_ROWS` rows, `onednn` for more; elsewhere both are None."""

    small: torch.Tensor  # [out, in] matmul_dtype (where `onednn` is set: a view of an [in, out] tensor)
    big: torch.Tensor | None  # [out, in] activation dtype, == small exactly
    onednn: torch.Tensor | None = None  # oneDNN-reordered `small` (opaque layout)
    few_rows: torch.Tensor | None = None  # [out, in] contiguous, == small exactly


@dataclass(slots=True)
class LayerWeights:
    wqkv: PackedMatrix  # [(num_heads + 2 * num_kv_heads) * head_dim, hidden], ln1 folded, q scaled
    wo: PackedMatrix  # [hidden, num_heads * head_dim]
    wgu: PackedMatrix  # [2 * intermediate, hidden], ln2 folded
    wdown: PackedMatrix  # [hidden, intermediate]


@dataclass(slots=True)
class Segment:
    """Rows [start, end) of one session in a layer call, with that layer's cache."""

    k: torch.Tensor  # [num_kv_heads, capacity, head_dim] (this layer), RoPE applied
    v: torch.Tensor  # [num_kv_heads, capacity, head_dim]
    start: int
    end: int


class LlamaWeights:
    """The packed weights of the first `num_layers` layers (default: all) of a Llama model."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_layers: int | None = None,
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        """NOTE (matmul_dtype): drafters default to fp16 (`DrafterConfig.matmul_dtype` says
        what was measured against fp32 through oneDNN). CPU fp16 kernels collapse beyond a
        few rows (120-row prefill: fp16 66 ms vs fp32 15 ms), so calls of more than
        `MAX_SMALL_ROWS` rows use the activation dtype over the exactly upcast weights with
        low-precision-rounded inputs and outputs: the small kernel's numbers up to
        accumulation order (measured: 99.9 % bit-equal, the rest 1 fp16 ulp)."""
        cfg = model.config
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise ValueError("biased Llama projections are not supported by the lean forward")
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (silu only)")
        self.num_layers = num_layers or cfg.num_hidden_layers
        if self.num_layers > cfg.num_hidden_layers:
            raise ValueError(f"{self.num_layers} layers > the model's {cfg.num_hidden_layers}")
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
            head = model.lm_head.weight.detach().float() * inner.norm.weight.detach().float()
            self.head = self._pack_matrix(head)  # [vocab, hidden], final norm folded
            self.layers = [self._pack_layer(layer) for layer in inner.layers[: self.num_layers]]
            pos = torch.arange(self.max_positions, device=self.device).unsqueeze(0)
            cos, sin = inner.rotary_emb(self.embed[:1].unsqueeze(0), pos)
        half = self.head_dim // 2
        self.cos = cos[0].to(self.dtype).unsqueeze(1)  # [max_positions, 1, head_dim]
        # rotate_half(x) * sin == x[..., perm] * signed_sin (one gather instead of a cat)
        sin = sin[0].to(self.dtype).clone()
        sin[:, :half] = -sin[:, :half]
        self.sin_signed = sin.unsqueeze(1)  # [max_positions, 1, head_dim]
        self.rot_perm = torch.cat([torch.arange(half, self.head_dim), torch.arange(0, half)]).to(self.device)

    def _pack_layer(self, layer) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        ln1 = layer.input_layernorm.weight.detach().float()
        ln2 = layer.post_attention_layernorm.weight.detach().float()
        q = attn.q_proj.weight.detach().float() * self.head_dim**-0.5
        qkv = torch.cat([q, attn.k_proj.weight.float(), attn.v_proj.weight.float()]) * ln1
        gu = torch.cat([mlp.gate_proj.weight.float(), mlp.up_proj.weight.float()]) * ln2
        return LayerWeights(
            wqkv=self._pack_matrix(qkv),
            wo=self._pack_matrix(attn.o_proj.weight.detach().float()),
            wgu=self._pack_matrix(gu),
            wdown=self._pack_matrix(mlp.down_proj.weight.detach().float()),
        )

    def _pack_matrix(self, w: torch.Tensor) -> PackedMatrix:  # w: [out, in] float32
        small = w.to(self.matmul_dtype).contiguous()
        big = None if self.matmul_dtype == self.dtype else small.to(self.dtype)
        onednn = few_rows = None
        if ONEDNN and big is None and small.dtype == torch.float32 and small.device.type == "cpu":
            onednn = torch.ops.mkldnn._reorder_linear_weight(small, 4)  # 4: the batch-size hint
            # NOTE: not for fp16/bf16, whose one-row kernels are slower over [in, out]
            few_rows = small
            small = small.t().contiguous().t()  # [out, in] view of an [in, out] tensor
        return PackedMatrix(small=small, big=big, onednn=onednn, few_rows=few_rows)

    def new_kv(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty K and V buffers: 2 x [num_layers, num_kv_heads, capacity, head_dim]."""
        shape = (self.num_layers, self.num_kv_heads, capacity, self.head_dim)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))  # fmt: skip

    # ------------------------------------------------------------------ ops

    def norm(self, x: torch.Tensor) -> torch.Tensor:  # [rows, hidden], weight folded away
        # HF's LlamaRMSNorm formula; 2 % faster a step here than F.rms_norm's CPU kernel
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)

    def mm(
        self,
        x: torch.Tensor,  # [rows, in] activation dtype
        w: PackedMatrix,
    ) -> torch.Tensor:  # [rows, out] activation dtype
        if w.big is None:
            n = x.shape[0]
            if w.onednn is not None and n > MKL_MAX_ROWS:
                padded = onednn_rows(n)
                if padded != n:
                    x = F.pad(x, (0, 0, 0, padded - n))  # [padded, in], zero rows
                return torch.ops.mkldnn._linear_pointwise(x, w.onednn, None, "none", [], "")[:n]
            if w.few_rows is not None and n > 1:
                return F.linear(x, w.few_rows)
            return F.linear(x, w.small)
        low = w.small.dtype
        if x.shape[0] <= MAX_SMALL_ROWS:
            return F.linear(x.to(low), w.small).to(x.dtype)
        # the small kernel's numbers: low-precision inputs and outputs, wide accumulation
        return F.linear(x.to(low).to(x.dtype), w.big).to(low).to(x.dtype)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:  # rows: [b, hidden] -> [b, vocab]
        return self.mm(self.norm(rows), self.head)

    def layer(
        self,
        li: int,
        x: torch.Tensor,  # [rows, hidden]: the segments' rows, concatenated in order
        segments: Sequence[Segment],
    ) -> torch.Tensor:  # [rows, hidden] residual after layer `li`
        """Layer `li` over several sessions' rows: every matmul runs once over all rows;
        RoPE by position, the cache writes and causal attention run per segment."""
        w = self.layers[li]
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        group = nh // nkv
        if len(segments) == 1:
            cos = self.cos[segments[0].start : segments[0].end]  # [rows, 1, hd]
            sin = self.sin_signed[segments[0].start : segments[0].end]
        else:
            pos = torch.cat([torch.arange(s.start, s.end) for s in segments]).to(self.device)
            cos, sin = self.cos[pos], self.sin_signed[pos]
        rows = x.shape[0]
        qkv = self.mm(self.norm(x), w.wqkv)  # [rows, (nh + 2 nkv) hd], q pre-scaled
        qk = qkv[:, : (nh + nkv) * hd].view(rows, nh + nkv, hd)
        qk = qk * cos + qk[..., self.rot_perm] * sin  # RoPE on q and k at once
        v = qkv[:, (nh + nkv) * hd :].view(rows, nkv, hd)
        outs = []
        off = 0
        for seg in segments:
            s, e = seg.start, seg.end
            t = e - s
            q = qk[off : off + t, :nh]  # [t, nh, hd]
            seg.k[:, s:e] = qk[off : off + t, nh:].transpose(0, 1)
            seg.v[:, s:e] = v[off : off + t].transpose(0, 1)
            off += t
            keys, values = seg.k[:, :e], seg.v[:, :e]  # [nkv, e, hd]
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
        x = x + self.mm(a, w.wo)
        gate, up = self.mm(self.norm(x), w.wgu).split(self.intermediate, dim=-1)
        return x + self.mm(F.silu(gate) * up, w.wdown)


@dataclass(slots=True)
class SlotCache:
    """KV cache of a batched target engine: one slot per row (request), preallocated, written
    by position; slot s holds positions [0, lengths[s]). A rollback only lowers a length."""

    k: torch.Tensor  # [num_layers, num_slots, num_kv_heads, capacity, head_dim], RoPE applied
    v: torch.Tensor  # [num_layers, num_slots, num_kv_heads, capacity, head_dim]
    lengths: list[int]  # [num_slots]

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


@dataclass(slots=True)
class RowFeed:
    """One row of a batched step: tokens appended to a slot after its valid prefix."""

    slot: int
    token_ids: Sequence[int]  # [t], t >= 1
    num_logits: int  # next-token logits wanted for the last `num_logits` tokens (0..t)
    # A tree (`shared.draft_tree`): parent of each fed token within the feed (-1: the slot's
    # cached prefix). Token i is written at cache index start + i but sits at position
    # start + depth(i) and attends to the prefix and its own ancestors only. None: a chain.
    tree_parents: Sequence[int] | None = None


@dataclass(slots=True)
class StepLayout:
    """Where each of a step's N tokens goes, built once per step and shared by every layer.
    Rows are padded to T tokens for attention only; matmuls run over the N packed tokens."""

    slots: torch.Tensor  # [B] slot of each row
    tok_slot: torch.Tensor  # [N] slot of each token
    tok_index: torch.Tensor  # [N] cache index each token is written at
    tok_pos: torch.Tensor  # [N] position of each token in its row's sequence (RoPE)
    pad_index: torch.Tensor | None  # [N] index into the padded [B * T] rows; None when B == 1
    num_rows: int  # B
    max_tokens: int  # T
    num_keys: int  # keys attention reads per row: max over rows of start + t
    mask: torch.Tensor | None  # [B, 1, T, num_keys] True = may attend; None: one token, one row
    cos: torch.Tensor  # [N, 1, head_dim]
    sin: torch.Tensor  # [N, 1, head_dim]
    one_row: tuple[int, int] | None = None  # (slot, start) when B == 1: slices, no gathers
    slot_range: tuple[int, int] | None = None  # [first, end) when B > 1 rows hold those slots: no gathers


class LlamaForward:
    """Target path: every layer for every fed token, many rows (requests) per step over a
    `SlotCache`, in the checkpoint's dtype unless `matmul_dtype` says otherwise.

    One step = one call: the matmuls run once over all N tokens of all rows (ragged: a row
    feeds its pending token plus its draft, or a chunk of its prompt); attention runs once
    over the rows padded to the longest, with a per-row causal mask by position. No Python
    loop over rows inside the layers; index tensors are built once per step."""

    def __init__(self, weights: LlamaWeights) -> None:
        self.weights = weights

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, dtype: torch.dtype | Literal["auto"] = "auto"
    ) -> LlamaForward:
        """Load an HF Llama directory; "auto" keeps the checkpoint's dtype (the target path)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
        return cls(LlamaWeights(model.eval()))

    def new_cache(self, num_slots: int, capacity: int | None = None) -> SlotCache:
        w = self.weights
        capacity = min(capacity or w.max_positions, w.max_positions)
        shape = (w.num_layers, num_slots, w.num_kv_heads, capacity, w.head_dim)
        return SlotCache(torch.zeros(shape, dtype=w.dtype, device=w.device),
                         torch.zeros(shape, dtype=w.dtype, device=w.device), [0] * num_slots)  # fmt: skip

    def layout(self, cache: SlotCache, feeds: Sequence[RowFeed]) -> StepLayout:
        w, dev = self.weights, self.weights.device
        num_rows = len(feeds)
        counts = [len(f.token_ids) for f in feeds]
        starts_list = [cache.lengths[f.slot] for f in feeds]
        for f, start, t in zip(feeds, starts_list, counts):
            assert t > 0 and start + t <= cache.capacity, (f.slot, start, t, cache.capacity)
        trees = [i for i, f in enumerate(feeds) if f.tree_parents is not None and not is_chain(f.tree_parents)]
        if num_rows == 1:  # a single stream: views instead of index tensors
            slot, start, n = feeds[0].slot, starts_list[0], counts[0]
            tok_index = torch.arange(start, start + n, device=dev)  # [n]
            keys = torch.arange(start + n, device=dev)  # [start + n]
            mask = None if n == 1 else (keys <= tok_index.unsqueeze(1)).view(1, 1, n, start + n)
            slots = torch.tensor([slot], device=dev)
            cos, sin, tok_pos = w.cos[start : start + n], w.sin_signed[start : start + n], tok_index
            if trees:
                parents = feeds[0].tree_parents
                tok_pos = start - 1 + torch.tensor(depths_of(parents), device=dev)  # [n]
                cos, sin = w.cos[tok_pos], w.sin_signed[tok_pos]
                mask[0, 0, :, start:] = _ancestors(parents, dev)
            return StepLayout(
                slots=slots, tok_slot=slots.expand(n), tok_index=tok_index, tok_pos=tok_pos, pad_index=None,
                num_rows=1, max_tokens=n, num_keys=start + n, mask=mask, cos=cos, sin=sin, one_row=(slot, start),
            )  # fmt: skip
        slot_list = [f.slot for f in feeds]
        slots = torch.tensor(slot_list, device=dev)  # [B]
        t = torch.tensor(counts, device=dev)  # [B]
        starts = torch.tensor(starts_list, device=dev)  # [B]
        max_t = max(counts)
        num_keys = max(s + c for s, c in zip(starts_list, counts))
        # a row's place in the padded attention batch: where the rows' slots are one dense
        # run, its slot's place in that run (attention then reads the cache through a view),
        # else its feed order (keys and values gathered by slot)
        first_slot = min(slot_list)
        dense = sorted(slot_list) == list(range(first_slot, first_slot + num_rows))
        place = [s - first_slot for s in slot_list] if dense else list(range(num_rows))
        place_t = torch.tensor(place, device=dev)  # [B]
        starts_by_place = torch.empty_like(starts).index_copy_(0, place_t, starts)  # [B]
        row = torch.repeat_interleave(torch.arange(num_rows, device=dev), t)  # [N]
        offset = torch.arange(row.numel(), device=dev) - (torch.cumsum(t, 0) - t)[row]  # [N]
        tok_index = starts[row] + offset  # [N]
        query_index = starts_by_place.unsqueeze(1) + torch.arange(max_t, device=dev)  # [B, T] by place
        keys = torch.arange(num_keys, device=dev)  # [num_keys]
        mask = (keys <= query_index.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, num_keys] by place
        tok_pos = tok_index
        if trees:  # positions by depth, attention to ancestors (a loop over tree rows, once per step)
            depth_offset = offset.clone()  # [N] position - start of each token
            first = (torch.cumsum(t, 0) - t).tolist()
            for b in trees:
                f, start, n = feeds[b], starts_list[b], counts[b]
                depth_offset[first[b] : first[b] + n] = torch.tensor(depths_of(f.tree_parents), device=dev) - 1
                mask[place[b], 0, :n, start : start + n] = _ancestors(f.tree_parents, dev)
            tok_pos = starts[row] + depth_offset
        return StepLayout(
            slots=slots, tok_slot=slots[row], tok_index=tok_index, tok_pos=tok_pos,
            pad_index=place_t[row] * max_t + offset,
            num_rows=num_rows, max_tokens=max_t, num_keys=num_keys, mask=mask,
            cos=w.cos[tok_pos], sin=w.sin_signed[tok_pos],
            slot_range=(first_slot, first_slot + num_rows) if dense else None,
        )  # fmt: skip

    @torch.inference_mode()
    def step(
        self, cache: SlotCache, feeds: Sequence[RowFeed]
    ) -> torch.Tensor:  # [sum of num_logits, vocab] logits, rows in feed order
        """Append every feed's tokens to its slot; return the wanted next-token logits."""
        w = self.weights
        layout = self.layout(cache, feeds)
        ids = [tok for f in feeds for tok in f.token_ids]
        x = w.embed[torch.tensor(ids, dtype=torch.long, device=w.device)]  # [N, hidden]
        for li in range(w.num_layers):
            x = self._layer(li, x, cache, layout)
        if len(feeds) == 1:
            cache.lengths[feeds[0].slot] += len(feeds[0].token_ids)
            return w.logits(x[x.shape[0] - feeds[0].num_logits :])
        ends = torch.cumsum(torch.tensor([len(f.token_ids) for f in feeds]), 0)  # [B]
        wanted = torch.tensor([f.num_logits for f in feeds])  # [B]
        first = torch.repeat_interleave(ends - wanted, wanted)  # [M] a row's first wanted index
        within = torch.arange(first.numel()) - (torch.cumsum(wanted, 0) - wanted).repeat_interleave(wanted)
        for f in feeds:
            cache.lengths[f.slot] += len(f.token_ids)
        return w.logits(x[(first + within).to(w.device)])

    def _layer(self, li: int, x: torch.Tensor, cache: SlotCache, layout: StepLayout) -> torch.Tensor:
        w = self.weights
        lw = w.layers[li]
        nh, nkv, hd = w.num_heads, w.num_kv_heads, w.head_dim
        n = x.shape[0]
        qkv = w.mm(w.norm(x), lw.wqkv)  # [N, (nh + 2 nkv) hd], q pre-scaled
        qk = qkv[:, : (nh + nkv) * hd].view(n, nh + nkv, hd)
        qk = qk * layout.cos + qk[..., w.rot_perm] * layout.sin  # RoPE on q and k at once
        ck, cv = cache.k[li], cache.v[li]  # [slots, nkv, capacity, hd]
        v_new = qkv[:, (nh + nkv) * hd :].view(n, nkv, hd)
        b, t, length = layout.num_rows, layout.max_tokens, layout.num_keys
        if layout.one_row is not None:  # views of the slot: no gathers, no copies
            s, start = layout.one_row
            ck[s, :, start:length] = qk[:, nh:].transpose(0, 1)  # [nkv, n, hd]
            cv[s, :, start:length] = v_new.transpose(0, 1)
            keys, values = ck[s : s + 1, :, :length], cv[s : s + 1, :, :length]  # [1, nkv, L, hd]
            q = qk[:, :nh].transpose(0, 1).unsqueeze(0)  # [1, nh, t, hd]
        else:
            ck[layout.tok_slot, :, layout.tok_index] = qk[:, nh:]  # [N, nkv, hd]
            cv[layout.tok_slot, :, layout.tok_index] = v_new
            # NOTE: cut to the longest row's length before gathering: gathering whole slots
            # copied max_context positions per row (index_select took 77 % of a 16-row step
            # on target-m, about 4.7 ms per row)
            if layout.slot_range is not None:  # rows in slot order (`layout`'s places)
                first, end = layout.slot_range
                keys, values = ck[first:end, :, :length], cv[first:end, :, :length]  # [B, nkv, L, hd]
            else:
                keys = ck[:, :, :length].index_select(0, layout.slots)  # [B, nkv, L, hd]
                values = cv[:, :, :length].index_select(0, layout.slots)
            q = x.new_zeros(b * t, nh, hd).index_copy_(0, layout.pad_index, qk[:, :nh])
            q = q.view(b, t, nh, hd).transpose(1, 2)  # [B, nh, T, hd]
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=layout.mask, scale=1.0, enable_gqa=nh != nkv
        )  # [B, nh, T, hd]
        o = o.transpose(1, 2).reshape(b * t, nh * hd)
        a = o if layout.pad_index is None else o.index_select(0, layout.pad_index)  # [N, nh hd]
        x = x + w.mm(a, lw.wo)
        gate, up = w.mm(w.norm(x), lw.wgu).split(w.intermediate, dim=-1)
        return x + w.mm(F.silu(gate) * up, lw.wdown)

    @staticmethod
    def rollback(cache: SlotCache, slot: int, num_keep: int) -> None:
        """Drop a slot's positions past the first `num_keep` (rejected drafts): no copy."""
        assert 0 <= num_keep <= cache.lengths[slot], (num_keep, cache.lengths[slot])
        cache.lengths[slot] = num_keep

    @staticmethod
    def keep_path(cache: SlotCache, slot: int, start: int, path: Sequence[int]) -> None:
        """After a tree feed at cache index `start`: keep the prefix and the fed tokens at
        `path` (feed indices, root first), in that order, and drop the rest. Tokens already
        in place stay; the accepted nodes off the first branch move once (a few positions
        per round, every layer in one copy)."""
        assert start + len(path) <= cache.lengths[slot], (start, path, cache.lengths[slot])
        moved = [(start + j, start + i) for j, i in enumerate(path) if i != j]
        if moved:
            dst = torch.tensor([d for d, _ in moved])
            src = torch.tensor([s for _, s in moved])
            cache.k[:, slot, :, dst] = cache.k[:, slot, :, src]  # [layers, nkv, m, hd]
            cache.v[:, slot, :, dst] = cache.v[:, slot, :, src]
        cache.lengths[slot] = start + len(path)


def _ancestors(parents: Sequence[int], device: torch.device) -> torch.Tensor:
    """[n, n] bool: token i may attend to token j of its feed (j is i or an ancestor)."""
    n = len(parents)
    allowed = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            allowed[i] |= allowed[p]
    return allowed.to(device)
