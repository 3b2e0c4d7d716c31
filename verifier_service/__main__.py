"""`python -m verifier_service --target NAME [--config cfg.yaml] [--drafter HOST:PORT]
[--host H] [--port P] [--metrics-port M] [--max-sessions N]`

Runs one target's verifier replica as a grpc.aio server. Prints `LISTENING <port>` as soon
as the port is bound (port 0 = any free port), reports NOT_SERVING on the health service
until the target is loaded, and on SIGTERM stops taking requests and lets in-flight ones
finish for `--grace` seconds.

With a Redis store configured the replica announces itself in the registry; without
`--drafter` it then finds a drafter pool there too, and moves to another live pool when
its own stops answering (`verifier_service.drafter_discovery`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from shared.config import SpecdecConfig
from shared.pb.specdec.v1 import verifier_pb2_grpc
from shared.serving import (
    add_service_arguments,
    configure_logging,
    grpc_server,
    load_config_or_exit,
    run_service,
)
from shared.tls import internal_server_credentials

logger = logging.getLogger("verifier_service")

SERVICE_NAME = "specdec.v1.VerifierService"
DEFAULT_PORT = 50071


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m verifier_service", description=__doc__.splitlines()[0])
    add_service_arguments(p, DEFAULT_PORT, default_grace=30.0)
    p.add_argument("--target", required=True, help="target name from the config")
    p.add_argument("--drafter", help="drafter pool address HOST:PORT (model-based methods); "
                   "default with a Redis store: any live pool in the registry")
    p.add_argument("--max-batch-rows", type=int, help="default: the target's max_batch_rows")
    p.add_argument("--max-queued-requests", type=int, help="default: the target's max_queued_requests")
    return p.parse_args(argv)


async def serve(
    config: SpecdecConfig,
    target: str,
    host: str,
    port: int,
    *,
    drafter: str | None = None,
    metrics_port: int | None = None,
    max_batch_rows: int | None = None,
    max_queued_requests: int | None = None,
    grace: float = 30.0,
) -> None:
    from shared.registry import advertised_address
    from shared.store import StoreAuthError, redis_url
    from verifier_service.drafter_discovery import DrafterFollower
    from verifier_service.servicer import VerifierServicer

    servicer = VerifierServicer(config, target, drafter_address=drafter, max_batch_rows=max_batch_rows,
                                max_queued_requests=max_queued_requests)  # fmt: skip
    try:
        servicer.store.check()  # down = degraded (a warning); wrong credentials = exit
    except StoreAuthError as e:
        servicer.close()
        raise SystemExit(f"store: {e}") from None
    server = grpc_server(config.limits)
    verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, server)
    # an explicit --drafter is kept as given; otherwise the registry (when shared) names one
    # (a config without drafters drafts nothing, as `specdec serve` starts no pool for it)
    follow = redis_url(config.store) and config.drafters and not drafter
    follower = DrafterFollower(servicer) if follow else None

    async def loaded(_, bound: int) -> None:
        if redis_url(config.store):  # announce this replica in the shared registry
            servicer.register(advertised_address(host, bound))
        if follower is not None:
            await follower.start()
        logger.info(
            "verifier of %r serving on %s:%d (methods %s, drafter %s, %d batch rows, queue %d)",
            target, host, bound, servicer.methods, servicer.drafter_address or "none",
            servicer.max_batch_rows, servicer.max_queued_requests,
        )  # fmt: skip

    try:
        await run_service(server, SERVICE_NAME, host, port, metrics_port, servicer.load, loaded, grace,
                          internal_server_credentials(config.tls))  # fmt: skip
    finally:
        if follower is not None:
            follower.close()
        servicer.close()
    logger.info("stopped")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    config = load_config_or_exit(args.config)
    try:
        config.target(args.target)
    except KeyError:
        raise SystemExit(
            f"target {args.target!r} is not in the config ({[t.name for t in config.targets]})"
        ) from None
    asyncio.run(
        serve(
            config,
            args.target,
            args.host or config.host,
            args.port,
            drafter=args.drafter,
            metrics_port=args.metrics_port,
            max_batch_rows=args.max_batch_rows,
            max_queued_requests=args.max_queued_requests,
            grace=args.grace,
        )
    )


if __name__ == "__main__":
    main()
