"""Validated configuration for every service (pydantic at the edges only, never in the loop).

A `SpecdecConfig` names the targets, the drafters of the shared pool and the speculation
policy. `default_config()` is the embedded demo: both demo targets, `codelm-draft` and the
committed sorted drafter, loopback ports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.methods import SPEC_METHODS, DrafterKind
from shared.paths import PROJECT_ROOT, models_dir

Dtype = Literal["float32", "float16", "bfloat16"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodSpeculation(_Frozen):
    """How the verifier's policy drafts with one method (`verifier_service.policy`)."""

    rule: Literal["fixed", "plus2minus1"] = Field(
        "fixed",
        description="'fixed': always num_speculative_tokens; 'plus2minus1': start there, all "
        "drafts accepted -> k + 2, a rejection -> k - 1 (Hugging Face's heuristic).",
    )
    num_speculative_tokens: int = Field(..., ge=0, description="k (the first k for plus2minus1).")
    drafter_params: dict[str, float] = Field(
        default_factory=dict,
        description="Drafter parameters for every request (sorted: 'fixed_exit' or "
        "'threshold.<exit>'; see shared.proposer.Proposer.set_params).",
    )
    drafter: str = Field(
        "",
        description="The pool drafter a model method's sessions ask for ('' = the pool's first "
        "of that kind; for card, of any kind).",
    )
    when_greedy: MethodSpeculation | None = Field(
        None,
        description="Used instead for greedy requests (temperature 0): greedy outputs of "
        "small code models repeat, so longer drafts pay there and not under sampling.",
    )

    @model_validator(mode="after")
    def _one_level(self) -> MethodSpeculation:
        if self.when_greedy is not None and self.when_greedy.when_greedy is not None:
            raise ValueError("when_greedy cannot have its own when_greedy")
        if self.when_greedy is not None and self.when_greedy.drafter:
            raise ValueError("when_greedy cannot pick a drafter: a method's sessions share one")
        return self

    def for_request(self, greedy: bool) -> MethodSpeculation:
        """The settings a request with this sampling mode gets."""
        return self.when_greedy if greedy and self.when_greedy is not None else self


class ModelConfig(_Frozen):
    name: str = Field(..., min_length=1, description="Name clients use to address the model.")
    model_dir: Path = Field(..., description="HF-format directory (weights + tokenizer).")
    dtype: Dtype = Field("float32", description="Weights and activations dtype.")
    device: str = Field("cpu", description="torch device, e.g. 'cpu' or 'cuda:0'.")
    num_threads: int = Field(1, gt=0, description="torch intra-op threads for this process.")
    max_context: int | None = Field(
        None, gt=0, description="Max prompt + generated tokens; default: the model's max positions."
    )

    @field_validator("model_dir")
    @classmethod
    def _dir_exists(cls, value: Path) -> Path:
        if not (value / "config.json").is_file():
            raise ValueError(f"model_dir {str(value)!r} has no config.json")
        return value


class TargetConfig(ModelConfig):
    max_new_tokens: int = Field(1024, gt=0, description="Upper bound on max_new_tokens per request.")
    replicas: int = Field(
        1, gt=0, description="Verifier processes `specdec serve` runs for this target (failover)."
    )
    speculation: dict[str, MethodSpeculation] = Field(
        default_factory=dict,
        description="Per-method overrides of speculation.methods for this target.",
    )
    max_batch_rows: int = Field(
        32, gt=0, description="Requests one verifier replica steps together (KV slots, preallocated)."
    )
    max_queued_requests: int = Field(
        224, ge=0, description="Requests a replica holds waiting for a row; beyond it: 429 / RESOURCE_EXHAUSTED."
    )
    queue_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest wait for a row; then 504 / DEADLINE_EXCEEDED (a client's own "
        "deadline ends it sooner).",
    )
    max_step_tokens: int = Field(
        512, gt=0, description="Token budget of one step: drafts first, prompt chunks fill the rest."
    )

    @property
    def replica_capacity(self) -> int:
        """Requests one replica takes at once (rows + queue); the router admits as many."""
        return self.max_batch_rows + self.max_queued_requests


class RunAheadConfig(_Frozen):
    """How a drafter grows `card`'s tree (`shared.run_ahead`, docs/card.md). Measured on
    this repository's 2-core CPU, codelm-draft for codelm-target-m, greedy, end to end:
    1 alternative without branches gave card 1.21-1.25x `none`; 3 alternatives with 4
    branches 1.14-1.16x, 2 with 6 1.14x, 1 with 2 1.18x. Branches found the target's token
    in 10 % of commits, and the drafting they cost ran on the core the verifier shares."""

    alternatives: int = Field(1, ge=1, le=8, description="Runner-up children kept beside each line token.")
    branches: int = Field(
        0, ge=0, le=16, description="Branches drafted under the likeliest alternatives of the round in "
        "flight (CARD's prepared outcomes); worth it where the drafter has cores of its own.",
    )
    branch_length: int = Field(2, ge=1, le=16, description="Tokens drafted under an alternative.")


class DrafterConfig(ModelConfig):
    kind: DrafterKind = Field(
        "draft_model", description="Proposer kind this drafter serves."
    )
    run_ahead: RunAheadConfig = Field(default_factory=RunAheadConfig, description="Its `card` sessions.")
    matmul_dtype: Dtype = Field(
        "float16",
        description="Weight dtype of the lean forward's (shared.llama) one-row matmuls; draft "
        "numerics only move acceptance, never the output. fp32 (oneDNN on CPU) drafts one "
        "session faster (1.15 vs 1.30 ms per 2-token draft of codelm-draft) but lost under "
        "load: `sorted` at 16 concurrent on target-s gave 0.84-0.88x `none` with fp32, 0.93x "
        "with fp16 (bench.loadtest, same runs).",
    )


class NgramConfig(_Frozen):
    min_n: int = Field(1, gt=0, description="Shortest suffix n-gram to match.")
    max_n: int = Field(4, gt=0, description="Longest suffix n-gram to match (tried first).")

    @model_validator(mode="after")
    def _ordered(self) -> NgramConfig:
        if self.min_n > self.max_n:
            raise ValueError(f"ngram min_n {self.min_n} > max_n {self.max_n}")
        return self


# NOTE: chosen on ../shared/data/train_prompts by `python -m tools.choose_defaults` (never on
# benchmark prompts); docs/speculation.md has the figures. Per-target overrides go in
# TargetConfig.speculation.
DEFAULT_METHODS: dict[str, MethodSpeculation] = {
    "ngram": MethodSpeculation(
        rule="plus2minus1", num_speculative_tokens=5, when_greedy=MethodSpeculation(num_speculative_tokens=5)
    ),
    "draft_model": MethodSpeculation(num_speculative_tokens=2, when_greedy=MethodSpeculation(num_speculative_tokens=3)),
    "card": MethodSpeculation(num_speculative_tokens=4),
    # NOTE: greedy ±2/−1 rather than the tool's in-process pick (k = 3: 1.000 against 0.990 on
    # the training prompts): through the pool each round pays a round trip, and there the
    # rule gave 1.07-1.12x `none` on target-s against k = 3's 0.97-0.99 (docs/speculation.md)
    "sorted": MethodSpeculation(
        num_speculative_tokens=3, drafter_params={"fixed_exit": 1.0},
        when_greedy=MethodSpeculation(rule="plus2minus1", num_speculative_tokens=5, drafter_params={"fixed_exit": 1.0}),
    ),
}


class SpeculationConfig(_Frozen):
    methods: dict[str, MethodSpeculation] = Field(
        default_factory=lambda: dict(DEFAULT_METHODS),
        description="Per speculation method: its rule, k and drafter parameters.",
    )
    max_speculative_tokens: int = Field(
        10, ge=0, description="Upper bound on k (plus2minus1's cap, and on a request's own k)."
    )
    draft_timeout_s: float = Field(
        0.05, gt=0, description="Longest a step waits for remote candidates before k = 0."
    )
    catch_up_tokens: int = Field(
        16, ge=0, description="A pool session more tokens behind its row than this (a new "
        "request, or tokens decoded plainly) catches up while the row runs plain, instead of "
        "the step waiting for its prefill.",
    )
    run_ahead_wait_s: float = Field(
        0.0, ge=0, description="Longest a step waits for the first token of a run-ahead (card) "
        "draft; 0 = only what the drafter has already streamed.",
    )
    charge_drafter_compute: bool = Field(
        True,
        description="The load-aware choice counts the drafter CPU seconds the pool reports "
        "as part of a drafting step's time, up to the time some task waited for a CPU in that step "
        "(Linux PSI): right where the pool shares the verifier's machine (`specdec serve`); set "
        "false where drafters run on hardware of their own.",
    )
    load_aware: bool = Field(
        True,
        description="A step drafts only where drafting has measured more tokens per second than "
        "plain steps at that batch size, method and sampling mode (probing the other now and then).",
    )

    @model_validator(mode="after")
    def _bounded(self) -> SpeculationConfig:
        for name, method in self.methods.items():
            if name not in SPEC_METHODS or name == "none":
                raise ValueError(f"speculation.methods: unknown method {name!r}")
            for where, spec in ((name, method), (f"{name}.when_greedy", method.when_greedy)):
                if spec is not None and spec.num_speculative_tokens > self.max_speculative_tokens:
                    raise ValueError(
                        f"speculation.methods.{where}.num_speculative_tokens "
                        f"{spec.num_speculative_tokens} > max_speculative_tokens "
                        f"{self.max_speculative_tokens}"
                    )
        return self

    def with_overrides(self, methods: dict[str, MethodSpeculation]) -> SpeculationConfig:
        """This config with some methods replaced (a target's own settings)."""
        if not methods:
            return self
        return SpeculationConfig.model_validate(
            {**self.model_dump(), "methods": {**self.methods, **methods}}
        )


class RequestLimits(_Frozen):
    """Bounds on what one request may ask for, checked before any work is done for it
    (a request is otherwise a way to take a process's memory or time)."""

    max_body_bytes: int = Field(1 << 20, gt=0, description="HTTP request body (413 above).")
    max_message_bytes: int = Field(
        1 << 20, gt=0,
        description="gRPC request message, checked by the application (INVALID_ARGUMENT above); "
        "the transport refuses messages over twice this (RESOURCE_EXHAUSTED, never retried).",
    )  # fmt: skip
    max_prompt_chars: int = Field(100_000, gt=0, description="Prompt text, before tokenization.")
    max_stop_strings: int = Field(4, ge=0, description="Stop strings per request (OpenAI: 4).")
    max_stop_chars: int = Field(256, gt=0, description="Characters per stop string.")


class AuthConfig(_Frozen):
    """Bearer API keys for the public APIs (HTTP `Authorization: Bearer <key>`, gRPC
    `authorization` metadata). Keys come from the environment variable SPECDEC_API_KEY
    (comma-separated) and/or `api_key_file` (one per line); none configured = open."""

    api_key_file: Path | None = Field(None, description="File of API keys, one per line.")
    protect_metrics: bool = Field(True, description="/metrics needs a key when keys are set.")
    reflection: bool = Field(True, description="Serve gRPC reflection on the public port.")
    rate_limit: str | None = Field(
        None, description="Requests per key (per client address without keys), in the `limits` "
        "library's notation, e.g. '60/minute' or '10/second;200/minute'; None = unlimited.",
    )  # fmt: skip

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            from limits import parse_many

            try:
                parse_many(value)
            except ValueError as e:
                raise ValueError(f"rate_limit {value!r}: {e}") from e
        return value


class TlsConfig(_Frozen):
    """Certificate files (PEM) for TLS on every hop (`shared.tls`); none = plaintext."""

    cert_file: Path | None = Field(None, description="Public certificate (router gRPC + HTTPS).")
    key_file: Path | None = Field(None, description="Its private key.")
    internal_ca_file: Path | None = Field(None, description="Internal CA: mTLS between services.")
    internal_cert_file: Path | None = Field(None, description="This deployment's internal certificate.")
    internal_key_file: Path | None = Field(None, description="Its private key.")

    @model_validator(mode="after")
    def _complete(self) -> TlsConfig:
        groups = {"public": (self.cert_file, self.key_file),
                  "internal": (self.internal_ca_file, self.internal_cert_file, self.internal_key_file)}  # fmt: skip
        for name, files in groups.items():
            if any(f is not None for f in files) and any(f is None for f in files):
                raise ValueError(f"tls: the {name} certificate files must be given together")
            for f in files:
                if f is not None and not Path(f).is_file():
                    raise ValueError(f"tls: {f} is not a file")
        return self


class SharedNgramConfig(_Frozen):
    """The n-gram table learned from accepted output of every request (`shared.ngram_table`)."""

    enabled: bool = Field(True, description="Learn from outputs and draft from the table when the "
                          "request's own context has no strong match (see own_match_min).")  # fmt: skip
    own_match_min: int = Field(
        3, ge=1, description="The request's own prompt-lookup draft wins over the table's only where it "
        "matched at least this many tokens; a shorter own match gives way to an aligned table draft.",
    )  # fmt: skip
    learn_prompts: bool = Field(False, description="Learn from prompts too (they are users' data).")
    sampled: bool = Field(
        False, description="Sampled requests draft from the table too. Off: measured, their draws follow "
        "another request's output too rarely to pay for the lookups (bench.shared_ngram); they still teach it.",
    )  # fmt: skip
    min_n: int = Field(2, gt=0, description="Shortest context (tokens) the table keys on.")
    max_n: int = Field(4, gt=0, description="Longest context (tried first).")
    continuation_len: int = Field(8, gt=0, le=64, description="Tokens stored per continuation.")
    keep_top: int = Field(4, gt=0, description="Continuations kept per context (highest counts).")
    local_cache_entries: int = Field(8192, ge=1, description="Recent answers a verifier keeps (per target).")
    local_cache_ttl_s: float = Field(
        5.0, gt=0, description="How long a recent answer is reused without asking the store (what other "
        "replicas learned since shows up after at most this long).",
    )  # fmt: skip
    ttl_s: int = Field(7 * 24 * 3600, gt=0, description="A context's entry expires this long after its last write.")
    min_acceptance: float = Field(
        0.2, ge=0.0, le=1.0, description="Contamination guard: the table's drafts are used only while "
        "their measured per-token acceptance for this target is at least this.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _ordered(self) -> SharedNgramConfig:
        if self.min_n > self.max_n:
            raise ValueError(f"store.shared_ngram min_n {self.min_n} > max_n {self.max_n}")
        return self


class DraftCacheConfig(_Frozen):
    """Repeated-prompt draft cache (`shared.draft_cache`): a greedy request's output stored
    under its prompt's hash; the same prompt later drafts from it first."""

    enabled: bool = Field(False, description="Store greedy outputs under their prompt's hash and draft "
                          "from them. Off by default: it keeps users' outputs keyed by their prompts.")  # fmt: skip
    sampled: bool = Field(False, description="Sampled requests draft from the cache too (they never write "
                          "it: a sampled output is one draw).")  # fmt: skip
    ttl_s: int = Field(24 * 3600, gt=0, description="An entry expires this long after it was written.")
    max_tokens: int = Field(1024, gt=0, le=65536, description="Output tokens stored per prompt (the first ones).")
    min_tokens: int = Field(4, gt=0, description="Shorter outputs are not stored (not worth a key).")


class StoreConfig(_Frozen):
    """Shared draft state (`shared.store`): in-memory per process by default; Redis when a URL
    is given here or in SPECDEC_REDIS_URL (which wins)."""

    redis_url: str | None = Field(None, description="redis:// or rediss:// URL; None = in-memory.")
    redis_username: str | None = Field(None, description="ACL user.")
    redis_password: str | None = Field(None, description="Password (SPECDEC_REDIS_PASSWORD wins).")
    redis_ca_file: Path | None = Field(None, description="CA certificate for rediss:// (TLS).")
    socket_timeout_s: float = Field(0.25, gt=0, description="Per-command timeout.")
    breaker_failures: int = Field(3, gt=0, description="Failures in a row that open the circuit breaker.")
    breaker_cooldown_s: float = Field(2.0, gt=0, description="How long the open breaker fails calls fast.")
    memory_max_keys: int = Field(200_000, gt=0, description="In-memory store: keys kept (oldest write out).")
    shared_ngram: SharedNgramConfig = Field(default_factory=SharedNgramConfig, description="Shared n-gram table.")
    draft_cache: DraftCacheConfig = Field(default_factory=DraftCacheConfig, description="Repeated-prompt draft cache.")
    isolate_tenants: bool = Field(
        True, description="With API keys configured, each key's requests learn from and draft with only "
        "their own n-gram table and draft cache (the key's id is a key segment): one user's outputs never "
        "shape another's drafts or timing. False: one table and cache for all keys.",
    )  # fmt: skip


class AutoscalingConfig(_Frozen):
    """Serve autoscaling of one target's verifier deployment, on ongoing requests."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(
        32.0, gt=0, description="Ongoing requests per replica Serve aims at (default: the batch rows)."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window the load is averaged over (Serve warns at ≤ 10 s, its deprecated metrics "
        "interval's default).",
    )  # fmt: skip
    upscale_delay_s: float = Field(5.0, ge=0, description="Load above target this long adds replicas.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Load below target this long removes replicas.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class RayConfig(_Frozen):
    """The Ray Serve application (`router.ray_app`): resources and scaling per deployment."""

    router_num_cpus: float = Field(0.5, ge=0, description="Per router (ingress) replica.")
    router_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources the router needs (KubeRay: the head, where "
        "the gRPC Service points).",
    )  # fmt: skip
    drafter_num_cpus: float = Field(1.0, ge=0, description="Per drafter-pool replica.")
    drafter_num_gpus: float = Field(0.0, ge=0)
    drafter_replicas: int = Field(1, gt=0)
    verifier_num_cpus: float = Field(1.0, ge=0, description="Per verifier replica.")
    verifier_num_gpus: float = Field(0.0, ge=0)
    autoscaling: dict[str, AutoscalingConfig] = Field(
        default_factory=dict, description="Per target; a target without an entry runs `replicas` fixed replicas."
    )  # fmt: skip
    target_resources: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Custom Ray resources a target's verifier replicas need (e.g. "
        "{'model-codelm-target-m': 0.01}): only nodes that have the target's weights offer them.",
    )  # fmt: skip
    drafter_resources: dict[str, float] = Field(default_factory=dict, description="Likewise for the drafter pool.")
    autoscaling_metrics_interval_s: float = Field(
        2.0, gt=0, description="How often replicas and handles report load to Serve's autoscaler (Serve "
        "reads it from RAY_SERVE_{REPLICA,HANDLE}_AUTOSCALING_METRIC_PUSH_INTERVAL_S, set in every replica's "
        "environment; its own default is 10 s).",
    )  # fmt: skip
    drain_timeout_s: float = Field(
        60.0, ge=0, description="How long a stopping replica (`serve shutdown`, scale-down, redeploy) keeps "
        "serving its in-flight requests before it is stopped.",
    )  # fmt: skip


class SpecdecConfig(_Frozen):
    targets: list[TargetConfig] = Field(..., min_length=1, description="Target models served.")
    drafters: list[DrafterConfig] = Field(
        default_factory=list, description="Drafters of the shared pool (serve every target)."
    )
    ngram: NgramConfig = Field(default_factory=NgramConfig, description="Prompt-lookup drafting.")
    speculation: SpeculationConfig = Field(
        default_factory=SpeculationConfig, description="Speculation policy defaults."
    )
    host: str = Field("127.0.0.1", description="Bind address of every service.")
    router_port: int = Field(50051, ge=0, description="Public gRPC port (0 = any free port).")
    http_port: int = Field(8000, ge=0, description="OpenAI-compatible HTTP port (0 = any).")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Per-request bounds.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Public API keys and rate limits.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS certificates (none: plaintext).")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Shared draft state (memory or Redis).")
    ray: RayConfig = Field(default_factory=RayConfig, description="The Ray Serve application (`specdec serve --ray`).")

    @model_validator(mode="after")
    def _unique_names(self) -> SpecdecConfig:
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate target names in {names}")
        for field, keys in (("ray.autoscaling", self.ray.autoscaling), ("ray.target_resources", self.ray.target_resources)):
            unknown = set(keys) - set(names)
            if unknown:
                raise ValueError(f"{field} names targets not in the config: {sorted(unknown)}")
        drafters = {d.name: d.kind for d in self.drafters}
        for target in self.targets:
            for method, spec in self.speculation_for(target.name).methods.items():
                if spec.drafter and spec.drafter not in drafters:
                    raise ValueError(f"speculation.methods.{method}.drafter {spec.drafter!r} is not a "
                                     f"configured drafter ({sorted(drafters)})")  # fmt: skip
                if spec.drafter and method in drafters.values() and drafters[spec.drafter] != method:
                    raise ValueError(f"speculation.methods.{method}.drafter {spec.drafter!r} serves "
                                     f"{drafters[spec.drafter]!r}, not {method!r}")  # fmt: skip
        return self

    def speculation_for(self, target: str) -> SpeculationConfig:
        """The speculation settings a verifier of `target` uses."""
        return self.speculation.with_overrides(self.target(target).speculation)

    def target(self, name: str) -> TargetConfig:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)

    @classmethod
    def load(cls, path: str | Path | None) -> SpecdecConfig:
        """The YAML config at `path`, or the embedded demo (`default_config()`) if None."""
        return cls.from_yaml(path) if path else default_config()

    @classmethod
    def from_yaml(cls, path: str | Path) -> SpecdecConfig:
        with open(path) as f:
            return cls.model_validate(yaml.safe_load(f))


def default_config(**overrides) -> SpecdecConfig:
    """The embedded demo: both demo targets and the demo drafters from `../shared/models`."""
    root = models_dir()
    targets = [
        TargetConfig(name=name, model_dir=root / name, max_context=2048)
        for name in ("codelm-target-m", "codelm-target-s")
    ]
    drafters = [DrafterConfig(name="codelm-draft", model_dir=root / "codelm-draft")]
    sorted_dir = PROJECT_ROOT / "models" / "codelm-sorted"
    if (sorted_dir / "config.json").is_file():
        drafters.append(DrafterConfig(name="codelm-sorted", model_dir=sorted_dir, kind="sorted"))
    return SpecdecConfig(targets=targets, drafters=drafters, **overrides)
