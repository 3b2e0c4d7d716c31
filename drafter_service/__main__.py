"""`python -m drafter_service [--config cfg.yaml] [--host H] [--port P] [--metrics-port M]`

Runs the shared drafter pool as a grpc.aio server. Prints `LISTENING <port>` as soon as the
port is bound (port 0 = any free port), reports NOT_SERVING on the health service until
every drafter is loaded, and on SIGTERM stops taking new streams and drains open ones for
`--grace` seconds.

With a Redis store configured (SPECDEC_REDIS_URL or `store.redis_url`) the pool announces
itself in the replica registry once loaded, under each of its tokenizer hashes
(`shared.registry`), so verifiers started without `--drafter` find it; a clean stop
deletes its keys, a killed pool's expire.

Every drafter serves every configured target: a drafter whose tokenizer differs from a
target's is a configuration error, reported (drafter, target, both tokenizer hashes) with
exit status 2 before the port is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from shared.config import SpecdecConfig
from shared.pb.specdec.v1 import drafter_pb2_grpc
from shared.serving import (
    CONFIG_ERROR_EXIT,
    add_service_arguments,
    configure_logging,
    grpc_server,
    load_config_or_exit,
    run_service,
)
from shared.tls import internal_server_credentials

logger = logging.getLogger("drafter_service")

SERVICE_NAME = "specdec.v1.DrafterService"
DEFAULT_PORT = 50061


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m drafter_service", description=__doc__.splitlines()[0])
    add_service_arguments(p, DEFAULT_PORT, default_grace=10.0)
    p.add_argument("--max-workers", type=int, default=8, help="executor threads for model forwards")
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
    from shared.registry import Heartbeat, advertised_address
    from shared.store import StoreAuthError, make_store, redis_url

    # the registry only means something on a store other machines share
    store = make_store(config.store) if redis_url(config.store) else None
    if store is not None:
        try:
            await store.ping()
        except StoreAuthError as e:
            await store.close()
            raise SystemExit(f"store: {e}") from None
        except Exception as e:  # noqa: BLE001 - down = degraded: the heartbeat keeps trying
            logger.warning("store %s unreachable at start-up (%s): registering when it answers", store.name, e)
    heartbeats: list[Heartbeat] = []
    server = grpc_server(config.limits)
    servicer = DrafterServicer(pool=None)
    drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, server)

    def load() -> DrafterPool:
        return DrafterPool.load(config.drafters, config.targets, max_workers=max_workers)

    def loaded(pool: DrafterPool, bound: int) -> None:
        servicer.pool = pool
        if store is not None:
            # NOTE: keyed by tokenizer, not target: the pool attaches any target that shares
            # a drafter's tokenizer at its first Open, so that is what a verifier must match
            address = advertised_address(host, bound)
            for tok_hash in sorted(pool.tokenizer_hashes):
                heartbeats.append(Heartbeat(store, "drafter", tok_hash, address))
                heartbeats[-1].start()
        logger.info(
            "drafter pool serving on %s:%d: drafters %s, methods %s",
            host, bound, pool.drafter_names, pool.methods,
        )  # fmt: skip

    try:
        await run_service(server, SERVICE_NAME, host, port, metrics_port, load, loaded, grace,
                          internal_server_credentials(config.tls))  # fmt: skip
    except ValueError as e:  # e.g. a tokenizer mismatch found while attaching targets
        logger.error("configuration error: %s", e)
        raise SystemExit(CONFIG_ERROR_EXIT) from None
    finally:
        for heartbeat in heartbeats:  # leave the registry before the models go
            await heartbeat.stop()
        if store is not None:
            await store.close()
        if servicer.pool is not None:
            servicer.pool.shutdown()
    logger.info("stopped")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    config = load_config_or_exit(args.config)
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
