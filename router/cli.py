"""The `specdec` command: `specdec serve` and the light gRPC client `specdec generate`.

    specdec serve [--config cfg.yaml] [--port N] [--http-port N]
    specdec generate --model M --prompt P [--method M] [--max-new-tokens N]
                     [--temperature T] [--seed S] [--server HOST:PORT] [--json]
    specdec models [--server HOST:PORT]

The client path starts fast: it imports grpc and the generated messages only, never torch
or transformers (every heavy import below is inside the function that needs it, and
`tests/router/test_cli.py` checks `sys.modules`). Plain mode streams text to stdout as it
arrives; `--json` prints one object with `token_ids`, `text`, `stats`, `finish_reason` and
`usage`. Exit status: 0 on success, 1 when the server returned an error, 2 on bad usage.
It talks through `router.client` (the API key from SPECDEC_API_KEY, retries only before
the first token).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shared.methods import SPEC_METHODS

if TYPE_CHECKING:
    from shared.pb.specdec.v1 import router_pb2

DEFAULT_SERVER = "127.0.0.1:50051"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Lossless speculative decoding service.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the router, drafter pool and one verifier per target")
    from router.serve import add_serve_arguments  # light: argparse only at import time

    add_serve_arguments(serve)
    serve.add_argument("--ray", action="store_true",
                       help="run as a Ray Serve application on a local Ray instance (or RAY_ADDRESS)")
    serve.add_argument("--redis", action="store_true",
                       help="share draft state through Redis: SPECDEC_REDIS_URL / store.redis_url, or "
                       "else a local redis-server (found on PATH) started for this run")  # fmt: skip

    gen = sub.add_parser("generate", help="generate from a running server (gRPC)")
    gen.add_argument("--model", required=True, help="target model name")
    gen.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    gen.add_argument("--method", default="", choices=("", *SPEC_METHODS),
                     help="speculation method (default: the server's)")  # fmt: skip
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--num-speculative-tokens", type=int, default=None,
                     help="fixed k per round (default: the method's configured default)")  # fmt: skip
    gen.add_argument("--server", default=DEFAULT_SERVER, help="router address HOST:PORT")
    gen.add_argument("--ca-file", help="TLS: the CA certificate (PEM) that signed the router's")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")

    models = sub.add_parser("models", help="list the served models")
    models.add_argument("--server", default=DEFAULT_SERVER)
    models.add_argument("--ca-file", help="TLS: the CA certificate (PEM) that signed the router's")
    return parser


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generate flags as `router.client` options."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop, method=args.method,
                num_speculative_tokens=args.num_speculative_tokens)  # fmt: skip


def prompt_of(args: argparse.Namespace) -> str:
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def build_request(args: argparse.Namespace) -> router_pb2.GenerateRequest:
    from router import client

    return client.build_request(args.model, prompt_of(args), **request_options(args))


def generate(args: argparse.Namespace) -> int:
    from router.client import ClientError, Completion, SpecdecClient

    done: Completion | None = None
    with SpecdecClient(args.server, timeout_s=args.timeout, ca_file=args.ca_file) as client:
        try:
            for item in client.stream(args.model, prompt_of(args), **request_options(args)):
                if isinstance(item, Completion):
                    done = item
                elif not args.json:
                    sys.stdout.write(item.text)
                    sys.stdout.flush()
        except ClientError as e:
            field = f" ({e.field})" if e.field else ""
            print(f"\nerror: {e.code.name}: {e.message}{field}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    assert done is not None
    if args.json:
        print(json.dumps({"token_ids": done.token_ids, "text": done.text, "finish_reason": done.finish_reason,
                          "usage": {"prompt_tokens": done.prompt_tokens,
                                    "completion_tokens": done.completion_tokens},
                          "stats": done.stats}))  # fmt: skip
    else:
        sys.stdout.write("\n")
        tau = done.stats.get("mean_acceptance_length", 1.0)
        print(f"[{done.finish_reason}; {len(done.token_ids)} tokens; tau {tau:.2f}]", file=sys.stderr)
    return 0


def list_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from router.client import ClientError, SpecdecClient

    with SpecdecClient(args.server, timeout_s=10, ca_file=args.ca_file) as client:
        try:
            models = client.models()
        except ClientError as e:
            print(f"error: {e.code.name}: {e.message}", file=sys.stderr)
            return 1
    print(json.dumps({"models": [asdict(m) for m in models]}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from router.serve import serve_main

        return serve_main(args)
    if args.command == "generate":
        return generate(args)
    return list_models(args)


if __name__ == "__main__":
    sys.exit(main())
