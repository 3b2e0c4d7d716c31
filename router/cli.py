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
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")

    models = sub.add_parser("models", help="list the served models")
    models.add_argument("--server", default=DEFAULT_SERVER)
    return parser


def auth_metadata() -> tuple[tuple[str, str], ...]:
    """`authorization: Bearer <key>` from SPECDEC_API_KEY (its first key), if set."""
    import os

    key = os.environ.get("SPECDEC_API_KEY", "").split(",")[0].strip()
    return (("authorization", f"Bearer {key}"),) if key else ()


def build_request(args: argparse.Namespace) -> router_pb2.GenerateRequest:
    from shared.pb.specdec.v1 import router_pb2
    from shared.types import SamplingParams
    from shared.wire import sampling_to_proto

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    request = router_pb2.GenerateRequest(
        model=args.model,
        text=prompt,
        sampling=sampling_to_proto(sampling),
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        method=args.method,
    )
    if args.num_speculative_tokens is not None:
        request.num_speculative_tokens = args.num_speculative_tokens
    return request


def generate(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from shared.pb.specdec.v1 import common_pb2, router_pb2_grpc

    request = build_request(args)
    token_ids: list[int] = []
    texts: list[str] = []
    result: dict[str, Any] = {}
    with grpc.insecure_channel(args.server) as channel:
        stub = router_pb2_grpc.GenerationServiceStub(channel)
        try:
            for response in stub.Generate(request, timeout=args.timeout, metadata=auth_metadata()):
                kind = response.WhichOneof("response")
                if kind == "chunk":
                    token_ids.extend(response.chunk.token_ids)
                    texts.append(response.chunk.text)
                    if not args.json:
                        sys.stdout.write(response.chunk.text)
                        sys.stdout.flush()
                elif kind == "complete":
                    c = response.complete
                    result = {
                        "token_ids": list(c.token_ids) or token_ids,
                        "text": c.text if c.token_ids else "".join(texts),
                        "finish_reason": common_pb2.FinishReason.Name(c.finish_reason)
                        .removeprefix("FINISH_REASON_")
                        .lower(),
                        "usage": {
                            "prompt_tokens": c.usage.prompt_tokens,
                            "completion_tokens": c.usage.completion_tokens,
                        },
                        "stats": json_format.MessageToDict(
                            c.stats,
                            preserving_proto_field_name=True,
                            always_print_fields_with_no_presence=True,
                        ),
                    }
                else:
                    err = response.error
                    field = f" ({err.field})" if err.field else ""
                    print(f"\nerror: {err.message}{field}", file=sys.stderr)
                    return 1
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    if args.json:
        print(json.dumps(result))
    else:
        sys.stdout.write("\n")
        stats = result.get("stats", {})
        print(
            f"[{result.get('finish_reason')}; {len(result.get('token_ids', []))} tokens; "
            f"tau {stats.get('mean_acceptance_length', 1.0):.2f}]",
            file=sys.stderr,
        )
    return 0


def list_models(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from shared.pb.specdec.v1 import router_pb2, router_pb2_grpc

    with grpc.insecure_channel(args.server) as channel:
        try:
            resp = router_pb2_grpc.GenerationServiceStub(channel).ListModels(
                router_pb2.ListModelsRequest(), timeout=10, metadata=auth_metadata()
            )
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(json.dumps(json_format.MessageToDict(resp, preserving_proto_field_name=True), indent=2))
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
