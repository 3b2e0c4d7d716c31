"""The specdec Ray Serve application: `import_path: router.ray_app:build_app`.

    router (ingress: OpenAI HTTP through Serve's HTTP proxy, public gRPC on its own server)
      └─ handle, streaming ─> verifier-<target>  (one deployment per target; autoscaled on
                                                  ongoing requests)
                                └─ gRPC Draft stream ─> drafter-pool (address by handle)

The deployments run the same servicers as `specdec serve`'s processes:
`router.server.Router` (validation, placement, admission, relay), `VerifierServicer` (step
loop, batching, queue) and the drafter pool. Only the verifier hop changes: the router
reaches each target's verifier deployment through a Serve handle
(`router.handles.HandleStub`), so Serve's autoscaler sees every ongoing request and spreads
requests over the deployment's replicas.

Public gRPC: the router replica runs its own `GenerationService` server (health,
reflection, server streaming: `grpcurl` and the `specdec` CLI work unchanged) on
`router_port`. NOTE: not Serve's gRPC proxy: in the installed Ray (2.60) the proxy routes
by application metadata, needs the servicer compiled into every proxy, and serves neither
our health service nor reflection, so `grpcurl -plaintext host:port list` and health checks
would break. Keep the router at one replica per node that exposes the port.

`max_ongoing_requests` of a verifier deployment = its batch rows + queue
(`TargetConfig.replica_capacity`); its replicas need the target's custom resources
(`ray.target_resources`), so they land only on nodes that have the weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

APP_NAME = "specdec"
# NOTE: no per-call access log: the router polls each verifier's load every 2 s
_QUIET = {"enable_access_log": False}


class RouterIngress:
    async def __init__(self, config: dict, verifiers: dict) -> None:  # type: ignore[misc]
        import asyncio

        from router.handles import HandleStub
        from router.server import Router, start_grpc_server
        from shared.config import SpecdecConfig

        cfg = SpecdecConfig.model_validate(config)
        self.router = await asyncio.get_running_loop().run_in_executor(None, Router.from_config, cfg)
        for target in cfg.targets:
            await self.router.add_deployment(target.name, f"verifier-{target.name}", HandleStub(verifiers[target.name]),
                                             target.replica_capacity * most_replicas(cfg, target))  # fmt: skip
        self.router.start_polling()
        self.drain_timeout_s = cfg.ray.drain_timeout_s
        self.grpc = await start_grpc_server(self.router, cfg.host, cfg.router_port)
        await self.grpc.set_serving(True)
        logger.info("specdec router on Ray: gRPC %s:%d", cfg.host, self.grpc.port)

    def __serve_build_asgi_app__(self):
        from router.http import create_app

        return create_app(self.router)

    def grpc_port(self) -> int:
        return self.grpc.port

    async def __del__(self) -> None:
        """Drain: Serve has already waited for the HTTP requests it routed here; the public
        gRPC server is ours, so its streams get the same grace before it stops."""
        self.router.draining = True  # new requests: UNAVAILABLE, a client retries elsewhere
        await self.grpc.set_serving(False)
        await self.router.wait_idle(self.drain_timeout_s)
        await self.grpc.server.stop(1)
        await self.router.close()


def _env(ray_cfg, num_threads: int | None = None) -> dict:
    """One torch/OpenMP thread per replica unless the target says otherwise; Serve's
    autoscaling metrics interval (an environment variable since Ray 2.50)."""
    interval = str(ray_cfg.autoscaling_metrics_interval_s)
    return {"env_vars": {"OMP_NUM_THREADS": str(num_threads or 1),
                         "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": interval,
                         "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": interval}}  # fmt: skip


def build_app(args: dict[str, Any] | None = None):
    """The application for a Serve config or `serve.run`. args: `config` = a specdec YAML
    path (default: the embedded demo), `config_dict` = the same as a dict (rendered
    manifests inline it)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from drafter_service.ray_deployment import DrafterPoolReplica
    from router.ray_routing import LeastLoadedRouter
    from shared.config import SpecdecConfig
    from verifier_service.ray_deployment import VerifierReplica

    args = args or {}
    if args.get("config_dict"):
        config = SpecdecConfig.model_validate(args["config_dict"])
    else:
        config = SpecdecConfig.load(args.get("config"))
    ray_cfg = config.ray
    as_dict = config.model_dump(mode="json")
    # Serve waits this long for a stopping replica's ongoing requests (`serve shutdown`,
    # scale-down, redeploys) before it calls the replica's `__del__`
    drain = {"graceful_shutdown_timeout_s": ray_cfg.drain_timeout_s, "graceful_shutdown_wait_loop_s": 1.0}

    drafter = None
    if config.drafters:
        drafter = serve.deployment(
            DrafterPoolReplica, name="drafter-pool", num_replicas=ray_cfg.drafter_replicas,
            ray_actor_options={"num_cpus": ray_cfg.drafter_num_cpus, "num_gpus": ray_cfg.drafter_num_gpus,
                               "resources": ray_cfg.drafter_resources, "runtime_env": _env(ray_cfg)},
            logging_config=_QUIET, **drain,
        ).bind(as_dict)  # fmt: skip
    verifiers = {}
    for target in config.targets:
        autoscaling = ray_cfg.autoscaling.get(target.name)
        scaling: dict[str, Any] = {"num_replicas": target.replicas}
        if autoscaling is not None:
            scaling = {"autoscaling_config": autoscaling.model_dump()}
        verifiers[target.name] = serve.deployment(
            VerifierReplica, name=f"verifier-{target.name}", max_ongoing_requests=target.replica_capacity,
            ray_actor_options={"num_cpus": ray_cfg.verifier_num_cpus, "num_gpus": ray_cfg.verifier_num_gpus,
                               "resources": ray_cfg.target_resources.get(target.name, {}),
                               "runtime_env": _env(ray_cfg, target.num_threads)},
            health_check_period_s=5, logging_config=_QUIET, **scaling, **drain,
            request_router_config=RequestRouterConfig(request_router_class=LeastLoadedRouter,
                                                      request_routing_stats_period_s=1.0),
        ).bind(as_dict, target.name, drafter)  # fmt: skip
    router = serve.deployment(
        serve.ingress()(RouterIngress), name="router", num_replicas=1,
        max_ongoing_requests=sum(t.replica_capacity * most_replicas(config, t) for t in config.targets) + 64,
        ray_actor_options={"num_cpus": ray_cfg.router_num_cpus, "resources": ray_cfg.router_resources,
                           "runtime_env": _env(ray_cfg)},
        logging_config=_QUIET, **drain,
    )  # fmt: skip
    return router.bind(as_dict, verifiers)


def most_replicas(config, target) -> int:
    """A target's verifier replicas at most: autoscaling's max, else its fixed count."""
    autoscaling = config.ray.autoscaling.get(target.name)
    return autoscaling.max_replicas if autoscaling else target.replicas


def cpus_needed(config) -> float:
    """Ray CPUs the application asks for at its largest (autoscaling at max replicas)."""
    ray_cfg = config.ray
    verifiers = sum(most_replicas(config, t) for t in config.targets)
    drafters = ray_cfg.drafter_replicas if config.drafters else 0
    return ray_cfg.router_num_cpus + drafters * ray_cfg.drafter_num_cpus + verifiers * ray_cfg.verifier_num_cpus


def serve_on_ray(config_path: str | None, host: str, http_port: int, grpc_port: int,
                 state_file: str | None = None) -> None:  # fmt: skip
    """`specdec serve --ray`: the application on a local Ray instance (or the cluster in
    RAY_ADDRESS) until SIGTERM/SIGINT; then it drains and shuts Serve down."""
    import signal
    import threading

    import ray
    from ray import serve

    from shared.config import SpecdecConfig
    from shared.serving import announce_port

    config = SpecdecConfig.load(config_path).model_copy(update={"router_port": grpc_port, "host": host})
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)  # an existing cluster
    else:
        # NOTE: one machine: every replica must fit, however few cores it has (Ray's CPUs
        # are logical; the replicas' threads are set per process, as in `specdec serve`)
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed(config))), include_dashboard=False,
                 logging_level=logging.WARNING)  # fmt: skip
    serve.start(http_options={"host": host, "port": http_port})
    serve.run(build_app({"config_dict": config.model_dump(mode="json")}), name=APP_NAME, route_prefix="/")
    bound = serve.get_deployment_handle("router", app_name=APP_NAME).grpc_port.remote().result()
    announce_port(bound)
    announce_port(http_port, "HTTP")
    if state_file:  # as `specdec serve` writes it (`router.stack.ServeProcess` reads it)
        state = {"pid": os.getpid(), "grpc_port": bound, "http_port": http_port, "children": []}
        Path(state_file).write_text(json.dumps(state))
    logger.info("specdec on Ray: gRPC %s:%d, HTTP %s:%d", host, bound, host, http_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    drain_and_shutdown()
    ray.shutdown()


def drain_and_shutdown(app_name: str = APP_NAME) -> None:
    """Stop the application without cutting requests in flight. `serve.delete` first: the
    app's replicas get `ray.drain_timeout_s` for their requests while Serve's proxies still
    carry the streams. NOTE: `serve.shutdown()` (and the `serve shutdown` CLI) alone kills
    the proxies at once, cutting every HTTP stream through them (Ray 2.60)."""
    from ray import serve

    serve.delete(app_name)  # blocks until every replica has drained and stopped
    serve.shutdown()
