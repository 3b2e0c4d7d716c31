"""`python -m drafter_service [--config cfg.yaml] [--host H] [--port P] [--metrics-port M]`

Runs the shared drafter pool as a grpc.aio server. Prints `LISTENING <port>` as soon as the
port is bound (port 0 = any free port), reports NOT_SERVING on the health service until
every drafter is loaded, and on SIGTERM stops taking new streams and drains open ones for
`--grace` seconds.

Every drafter serves every configured target: a drafter whose tokenizer differs from a
target's is a configuration error, reported (drafter, target, both tokenizer hashes) with
exit status 2 before the port is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc

from shared.config import SpecdecConfig, default_config
from shared.pb.specdec.v1 import drafter_pb2_grpc
from shared.serving import configure_logging, start_server

logger = logging.getLogger("drafter_service")

SERVICE_NAME = "specdec.v1.DrafterService"
DEFAULT_PORT = 50061
CONFIG_ERROR_EXIT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m drafter_service", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="SpecdecConfig YAML (default: the embedded demo config)")
    p.add_argument("--host", help="bind address (default: the config's host)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port; 0 = any free port")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (off if unset; 0 = any)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain streams on SIGTERM")
    p.add_argument("--max-workers", type=int, default=8, help="executor threads for model forwards")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(
    config: SpecdecConfig,
    host: str,
    port: int,
    *,
    metrics_port: int | None = None,
    grace: float = 10.0,
    max_workers: int = 8,
) -> None:
    from drafter_service.pool import DrafterPool
    from drafter_service.servicer import DrafterServicer

    server = grpc.aio.server()
    servicer = DrafterServicer(pool=None)
    drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, server)
    health, bound, stop = await start_server(server, SERVICE_NAME, host, port, metrics_port)

    loop = asyncio.get_running_loop()
    load = loop.run_in_executor(
        None, lambda: DrafterPool.load(config.drafters, config.targets, max_workers=max_workers)
    )
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([load, stopped], return_when=asyncio.FIRST_COMPLETED)
    if load in done:
        try:
            servicer.pool = load.result()
        except ValueError as e:  # e.g. a tokenizer mismatch found while attaching targets
            logger.error("configuration error: %s", e)
            await server.stop(0)
            raise SystemExit(CONFIG_ERROR_EXIT) from None
        await health.set(True)
        logger.info(
            "drafter pool serving on %s:%d: drafters %s, methods %s",
            host, bound, servicer.pool.drafter_names, servicer.pool.methods,
        )
        await stop.wait()

    logger.info("draining (grace %.1f s)", grace)
    await health.set(False)
    await server.stop(grace)
    if servicer.pool is not None:
        servicer.pool.shutdown()
    logger.info("stopped")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    config = SpecdecConfig.from_yaml(args.config) if args.config else default_config()
    if not config.drafters:
        raise SystemExit("the config has no drafters")
    from drafter_service.pool import check_tokenizers

    try:
        check_tokenizers(config.drafters, config.targets)
    except ValueError as e:
        logger.error("configuration error: %s", e)
        raise SystemExit(CONFIG_ERROR_EXIT) from None
    asyncio.run(
        serve(
            config,
            args.host or config.host,
            args.port,
            metrics_port=args.metrics_port,
            grace=args.grace,
            max_workers=args.max_workers,
        )
    )


if __name__ == "__main__":
    main()
