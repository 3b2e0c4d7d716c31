"""How many draft tokens to ask for each round (the verifier owns k; k = 0 allowed).

`AdaptiveKPolicy` starts from Hugging Face assisted generation's ±2/−1 rule (all drafts
accepted → k += 2, else k −= 1, within [1, max]) and adds a cost guard that turns
speculation off (k = 0) when it does not pay:

    spec_rate  = EMA(tokens emitted per speculative round) / EMA(speculative round time)
    plain_rate = 1 / EMA(time of a k = 0 round)

If spec_rate < plain_rate the policy runs k = 0 for a cool-down (doubling on each repeat
failure, reset on success), then probes again. A k = 0 round is also run every
`probe_every` speculative rounds so plain_rate stays measured on the same machine load.
Round times are wall-clock seconds the loop measured (draft + verify), so the guard
sees the real cost on whatever hardware it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Ema:
    alpha: float = 0.2
    value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


class FixedKPolicy:
    """Always k (the request asked for a fixed num_speculative_tokens)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def next_k(self) -> int:
        return self.k

    def update(self, k: int, num_accepted: int, round_time_s: float) -> None:
        pass

    def summary(self) -> dict[str, float]:
        return {"k": float(self.k), "adaptive": 0.0}


class AdaptiveKPolicy:
    def __init__(
        self,
        initial_k: int,
        max_k: int,
        probe_every: int = 32,
        min_cooldown: int = 8,
        max_cooldown: int = 256,
    ) -> None:
        self.k = max(1, min(initial_k, max_k)) if max_k > 0 else 0
        self.max_k = max_k
        self.probe_every = probe_every
        self.min_cooldown = min_cooldown
        self.max_cooldown = max_cooldown
        self._cooldown = min_cooldown
        self._off_rounds_left = 0
        self._spec_rounds_since_probe = 0
        self._spec_tokens = _Ema()
        self._spec_time = _Ema()
        self._plain_time = _Ema()
        self._num_spec_samples = 0
        self.num_off_rounds = 0

    def next_k(self) -> int:
        if self.max_k == 0:
            return 0
        if self._off_rounds_left > 0:
            return 0
        if self._plain_time.value is None or self._spec_rounds_since_probe >= self.probe_every:
            return 0  # measure plain decoding (one ordinary step, never wasted)
        return self.k

    def update(self, k: int, num_accepted: int, round_time_s: float) -> None:
        if k == 0:
            self._plain_time.add(round_time_s)
            self._spec_rounds_since_probe = 0
            if self._off_rounds_left > 0:
                self._off_rounds_left -= 1
                self.num_off_rounds += 1
            return
        self._spec_rounds_since_probe += 1
        self._spec_tokens.add(num_accepted + 1)
        self._spec_time.add(round_time_s)
        self._num_spec_samples += 1
        # ±2/−1 rule (HF assisted generation's heuristic), floor 1 while speculating.
        self.k = min(self.max_k, self.k + 2) if num_accepted == k else max(1, self.k - 1)
        if self._plain_time.value is None or self._num_spec_samples < 4:
            return  # too few samples to judge
        spec_rate = self._spec_tokens.value / self._spec_time.value
        plain_rate = 1.0 / self._plain_time.value
        if spec_rate < plain_rate:
            self._off_rounds_left = self._cooldown
            self._cooldown = min(self.max_cooldown, self._cooldown * 2)
            # restart the estimate after the cool-down instead of inheriting a stale bad one
            self._spec_tokens, self._spec_time = _Ema(), _Ema()
            self._num_spec_samples = 0
        else:
            self._cooldown = self.min_cooldown

    def summary(self) -> dict[str, float]:
        return {"k": float(self.k), "adaptive": 1.0, "num_off_rounds": float(self.num_off_rounds)}
