"""What API keys, rate limiting and TLS cost per request: p50/p90 latency of short requests
through a real router (gRPC, in process) to a real verifier of codelm-target-s, with keys
off, keys on, keys plus a (never reached) rate limit, TLS (throwaway trustme certificates)
and TLS plus keys, interleaved request by request.

    python -m bench.auth_cost --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from bench.common import environment, write_results

KEY = "sk-bench-0123456789abcdef"


async def run(num_requests: int) -> dict:
    from router.auth import API_KEY_ENV
    from router.client import AsyncSpecdecClient
    from router.server import Router, start_grpc_server
    from shared.config import AuthConfig, default_config
    from shared.loading import tokenizer_hash
    from shared.pb.specdec.v1 import verifier_pb2_grpc
    from shared.serving import grpc_server
    from verifier_service.engine import load_target
    from verifier_service.loop import SpecDecodeLoop
    from verifier_service.policy import RulePolicy
    from verifier_service.servicer import VerifierServicer

    target = "codelm-target-s"
    config = default_config().model_copy(update={"drafters": []})
    engine, tokenizer = load_target(config.target(target), max_batch_rows=4)
    servicer = VerifierServicer(config, target)
    servicer.attach(SpecDecodeLoop(engine, tokenizer, RulePolicy(config.speculation)),
                    tokenizer_hash(config.target(target).model_dir))  # fmt: skip
    verifier = grpc_server(config.limits)
    verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, verifier)
    verifier_address = f"127.0.0.1:{verifier.add_insecure_port('127.0.0.1:0')}"
    await verifier.start()
    import tempfile

    import trustme

    from shared.config import TlsConfig

    ca, pki = trustme.CA(), tempfile.mkdtemp()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(f"{pki}/ca.pem")
    cert.cert_chain_pems[0].write_to_path(f"{pki}/cert.pem")
    cert.private_key_pem.write_to_path(f"{pki}/key.pem")
    tls = TlsConfig(cert_file=f"{pki}/cert.pem", key_file=f"{pki}/key.pem")
    variants = {"no auth": (None, None, None), "api key": (KEY, None, None),
                "api key + rate limit": (KEY, "100000/second", None), "tls": (None, None, tls),
                "tls + api key": (KEY, None, tls)}  # fmt: skip
    clients, servers = {}, []
    for name, (key, rate, tls_config) in variants.items():
        if key:
            os.environ[API_KEY_ENV] = key
        else:
            os.environ.pop(API_KEY_ENV, None)
        router = Router.from_config(config.model_copy(update={"auth": AuthConfig(rate_limit=rate),
                                                              "tls": tls_config or TlsConfig()}))  # fmt: skip
        await router.add_replica(target, verifier_address)
        server = await start_grpc_server(router, "127.0.0.1", 0)
        await server.set_serving(True)
        servers.append((server, router))
        clients[name] = AsyncSpecdecClient(f"127.0.0.1:{server.port}", api_key=key or "",
                                           ca_file=f"{pki}/ca.pem" if tls_config else None)  # fmt: skip
    latencies: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(num_requests + 5):
        for name, client in clients.items():
            t0 = time.perf_counter()
            await client.generate(target, [1, 2, 3, 4], max_new_tokens=1, method="none")
            if i >= 5:  # warm-up
                latencies[name].append(time.perf_counter() - t0)
    for client in clients.values():
        await client.close()
    for server, router in servers:
        await server.server.stop(None)
        await router.close()
    await verifier.stop(None)
    return {
        name: {"p50_ms": 1e3 * statistics.median(xs), "p90_ms": 1e3 * statistics.quantiles(xs, n=10)[-1]}
        for name, xs in latencies.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args(argv)
    from shared.loading import set_num_threads

    set_num_threads(1)
    result = asyncio.run(run(args.requests))
    base = result["no auth"]["p50_ms"]
    lines = ["| variant | p50 ms | p90 ms | p50 over no auth |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p50_ms'] - base:+.2f} ms |"
              for name, r in result.items()]  # fmt: skip
    markdown = "# Auth and TLS cost per request (1-token requests, gRPC, in process)\n\n" + "\n".join(lines) + "\n"
    path = write_results("auth-cost", {"env": environment(), "results": result}, markdown)
    print(markdown)
    print(f"results: {path}.{{json,md}}")


if __name__ == "__main__":
    main()
