"""End-to-end part of the speedup benchmark (`python -m bench.speedup --e2e`).

Starts the real `specdec serve` stack (router, drafter pool, one verifier per target, loopback
gRPC) and, prompt by prompt, interleaves HF greedy in this process with each method through
the router's public `GenerationService.Generate`, greedy and sampled (`--temperature`,
seeded by prompt). Per target, mode and method: tokens/s end to end, speedup over
in-process HF greedy, time to first token, and where a round's time goes: target
forwards, drafting (for model drafts this includes the verifier<->drafter round trip),
and the rest of the wall time (router relay + verifier stream, per round). "identical"
compares greedy output with HF greedy and seeded sampled output with `none`'s for the
same seed (a seeded request's tokens do not depend on the method).

For `card`, the run-ahead's own counters (`SpecStats.drafter`): commits whose bonus or
correction token the drafter's tree held (the line's next token, or an alternative) and
those that found a branch drafted under it; the verifier's wait per round. For every
method, each process's CPU seconds over the method's wall time (`cpu`: router, drafter
pool, the target's verifier; from /proc, so Linux only): on a machine with few cores,
drafting that runs ahead competes with the target's forwards.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import humaneval_prompts_that_fit

E2E_METHODS = ("none", "ngram", "draft_model", "sorted", "card")


def _generate(stub, model: str, prompt: list[int], method: str, max_new_tokens: int,
              temperature: float = 0.0, seed: int = 0):  # fmt: skip
    from shared.pb.specdec.v1 import common_pb2, router_pb2

    sampling = common_pb2.SamplingParams(temperature=temperature)
    if temperature > 0:
        sampling.seed = seed
    request = router_pb2.GenerateRequest(
        model=model, token_ids=router_pb2.TokenIds(token_ids=prompt), max_new_tokens=max_new_tokens,
        method=method, sampling=sampling,
    )  # fmt: skip
    t0 = time.perf_counter()
    ttft = None
    for response in stub.Generate(request, timeout=120):
        kind = response.WhichOneof("response")
        if kind == "chunk" and ttft is None:
            ttft = time.perf_counter() - t0
        elif kind == "complete":
            return list(response.complete.token_ids), time.perf_counter() - t0, ttft, response.complete.stats
        elif kind == "error":
            raise RuntimeError(f"{method}: {response.error.message}")
    raise RuntimeError("stream ended without complete")


def run_e2e(args) -> dict:
    import grpc

    from router.stack import ServeProcess
    from shared.config import default_config
    from shared.loading import load_model, load_tokenizer
    from shared.pb.specdec.v1 import router_pb2, router_pb2_grpc

    config = default_config()
    stack = ServeProcess(Path(tempfile.mkdtemp(prefix="specdec-bench-")),
                         config.model_dump(mode="json") | {"router_port": 0, "http_port": 0})  # fmt: skip
    stack.start()
    results: dict = {}
    try:
        channel = grpc.insecure_channel(stack.grpc_address)
        stub = router_pb2_grpc.GenerationServiceStub(channel)
        offered = {m.name: list(m.methods) for m in stub.ListModels(router_pb2.ListModelsRequest()).models}
        for target in args.targets:
            tokenizer = load_tokenizer(config.target(target).model_dir)
            hf = load_model(config.target(target))
            methods = [m for m in E2E_METHODS if m in offered.get(target, []) or m == "none"]
            if args.methods:
                methods = [m for m in methods if m in args.methods or m == "none"]
            prompts = humaneval_prompts_that_fit(tokenizer, args.num_prompts, args.max_new_tokens)
            for mode in args.modes:
                temperature = 0.0 if mode == "greedy" else args.temperature
                results[f"{target} {mode}"] = _run_mode(stub, hf, target, prompts, methods, temperature, args,
                                                        _stack_processes(stack, target))  # fmt: skip
    finally:
        stack.stop()
    return results


def _cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds (/proc; 0 where it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stack_processes(stack, target: str) -> dict[str, int]:
    """The serve stack's processes by role (router, drafter pool, this target's verifier),
    from the pids its state file lists."""
    out = {"router": stack.proc.pid}
    for child in stack.state["children"]:
        if child["name"] == "pool":
            out["drafter"] = child["pid"]
        elif child["name"] == target:
            out["verifier"] = child["pid"]
    return out


def _run_mode(stub, hf, target: str, prompts: list[list[int]], methods: list[str], temperature: float, args,
              processes: dict[str, int]):  # fmt: skip
    totals: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for m in methods:  # warm-up: model caches, the policy's first estimates
        _generate(stub, target, prompts[0], m, args.max_new_tokens, temperature)
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            t0 = time.perf_counter()
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens,
                              do_sample=False)[0, len(prompt):].tolist()  # fmt: skip
            dt = time.perf_counter() - t0
        t = totals["hf_greedy (in process)"]
        t["tokens"] += len(ref)
        t["time_s"] += dt
        for m in methods:  # `none` first: the sampled rows' reference
            cpu_before = {role: _cpu_s(pid) for role, pid in processes.items()}
            tokens, wall, ttft, stats = _generate(stub, target, prompt, m, args.max_new_tokens, temperature, seed=i)
            if temperature > 0 and m == "none":
                ref = tokens
            t = totals[m]
            t["tokens"] += len(tokens)
            t["time_s"] += wall
            t["ttft_s"] += ttft or 0.0
            t["identical"] += tokens == ref
            t["runs"] += 1
            t["rounds"] += stats.num_rounds + 1  # + prefill
            t["spec_rounds"] += stats.num_spec_rounds
            t["accepted"] += stats.num_accepted_tokens
            t["target_time_s"] += stats.target_time_s
            t["draft_time_s"] += stats.draft_time_s
            for role, pid in processes.items():
                t[f"cpu_{role}"] += _cpu_s(pid) - cpu_before[role]
            for key, value in stats.drafter.items():
                t[f"drafter_{key}"] += value
        print(f"[e2e {target} T={temperature}] prompt {i + 1}/{len(prompts)}", flush=True)
    return _summarize(totals)


def _summarize(totals: dict) -> list[dict]:
    base = totals["hf_greedy (in process)"]
    base_tps = base["tokens"] / base["time_s"]
    rows = [{"method": "hf_greedy (in process)", "tokens_per_s": base_tps, "speedup": 1.0}]
    for method, t in totals.items():
        if method == "hf_greedy (in process)":
            continue
        tps = t["tokens"] / t["time_s"]
        rounds = t["rounds"]
        round_ms = 1e3 * t["time_s"] / rounds
        target_ms = 1e3 * t["target_time_s"] / rounds
        draft_ms = 1e3 * t["draft_time_s"] / rounds
        rows.append({
            "method": method, "tokens_per_s": tps, "speedup": tps / base_tps,
            "ttft_ms": 1e3 * t["ttft_s"] / t["runs"],
            "tau": 1 + t["accepted"] / t["spec_rounds"] if t["spec_rounds"] else 1.0,
            # card: the rounds that found a cached draft; others: that drafted at all
            "spec_share": t["spec_rounds"] / (t["rounds"] - t["runs"]),
            "round_ms": round_ms, "target_share": target_ms / round_ms, "draft_share": draft_ms / round_ms,
            "relay_share": 1 - (target_ms + draft_ms) / round_ms,
            "identical": f"{int(t['identical'])}/{int(t['runs'])}",
            "cpu": {key[4:]: t[key] / t["time_s"] for key in t if key.startswith("cpu_")},
        })  # fmt: skip
        if t["drafter_commits"]:  # card's run-ahead counters
            commits = t["drafter_commits"]
            rows[-1].update({
                "in_tree_share": (t["drafter_line_kept"] + t["drafter_alternative_commits"]) / commits,
                "branch_share": t["drafter_branch_commits"] / commits,
                "wait_share": 1e3 * t["drafter_wait_s"] / t["drafter_rounds"] / round_ms,
                "max_wait_ms": 1e3 * t["drafter_max_wait_s"],
            })  # fmt: skip
    return rows


def to_markdown(results: dict) -> str:
    out = []
    for key, rows in results.items():
        target, _, mode = key.partition(" ")
        same = "HF greedy" if mode == "greedy" else "none, same seed"
        out.append(f"\n## End to end through gRPC: {target}, {mode}\n")
        out.append(f"| method | tok/s | speedup vs HF greedy | TTFT ms | τ | rounds with a draft | ms/round | target share | draft share (incl. drafter RTT or wait) | relay share | identical ({same}) |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            g = lambda k, fmt="{:.2f}": fmt.format(r[k]) if k in r else ""  # noqa: E731
            out.append(f"| {r['method']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | {g('ttft_ms', '{:.1f}')} | "
                       f"{g('tau')} | {g('spec_share')} | {g('round_ms')} | {g('target_share')} | {g('draft_share')} | {g('relay_share')} | "
                       f"{r.get('identical', '')} |")
        out.append("\nCPU seconds per wall second, by process (router / drafter pool / verifier):\n")
        for r in rows:
            if "cpu" in r:
                out.append(f"- {r['method']}: " + " / ".join(f"{r['cpu'].get(k, 0):.2f}" for k in ("router", "drafter", "verifier")))
        for r in rows:
            if "in_tree_share" in r:
                out.append(f"\n`{r['method']}` run-ahead: bonus or correction token in the drafter's tree "
                           f"{r['in_tree_share']:.2f} of commits, a branch drafted under it {r['branch_share']:.2f}; "
                           f"wait {r['wait_share']:.3f} of a round (max {r['max_wait_ms']:.1f} ms)")
    m = results.get("codelm-target-m greedy")
    if m:
        by = {r["method"]: r for r in m}
        best = max((r for r in m if r["method"] != "hf_greedy (in process)"), key=lambda r: r["tokens_per_s"])
        out.append("\n### Targets (codelm-target-m, end to end)\n")
        none = by["none"]["speedup"]
        out.append(f"- none within 10% of HF greedy: {none:.2f} ({'met' if none >= 0.9 else 'NOT met'})")
        out.append(f"- best method ({best['method']}) >= 1.2x HF greedy: {best['speedup']:.2f} "
                   f"({'met' if best['speedup'] >= 1.2 else 'NOT met'})")
    return "\n".join(out) + "\n"
