"""The real `specdec serve` stack as subprocesses on loopback, shared by the whole session.

`serve_stack` starts `python -m router.cli serve` once (demo models, 2 batch rows and no
queue per replica so capacity tests stay cheap) and tears it down at the end of the session; tests
use the function-scoped `stack`, which restarts it only if a test stopped it (the SIGTERM
test). Process handling lives in `router/stack.py` (shared with `bench.speedup --e2e`).
"""

from __future__ import annotations

import pytest

from router.stack import ServeProcess, metric_samples  # noqa: F401  (re-exported for tests)
from shared.config import default_config

MAX_SESSIONS_PER_REPLICA = 2


@pytest.fixture(scope="session")
def serve_stack(tmp_path_factory):
    config = default_config().model_dump(mode="json")
    config.update(router_port=0, http_port=0)
    # NOTE: the load arms off: on this CPU they run the model drafters plain even alone,
    # and the exactness tests here need drafts (the arms: tests/verifier_service/test_policy.py)
    config["speculation"]["load_aware"] = False
    for target in config["targets"]:
        target.update(max_batch_rows=MAX_SESSIONS_PER_REPLICA, max_queued_requests=0)
    stack = ServeProcess(tmp_path_factory.mktemp("serve"), config)
    stack.start()
    print(f"\nspecdec serve ready in {stack.startup_s:.1f}s ({stack.grpc_address}, {stack.http_url})")
    yield stack
    if stack.running:
        rc = stack.stop()
        if rc != 0:
            print(f"specdec serve exited with {rc}:\n{stack.log_tail()}")


@pytest.fixture
def stack(serve_stack):
    serve_stack.ensure_running()
    return serve_stack


ONE_TARGET = "codelm-target-s"


@pytest.fixture(scope="module")
def one_target_stack(tmp_path_factory):
    """`specdec serve` on its default batch rows and queue, for ONE_TARGET only (load tests);
    one per test module, so each module's metrics count only its own requests."""
    config = default_config().model_dump(mode="json")
    config.update(router_port=0, http_port=0)
    config["targets"] = [t for t in config["targets"] if t["name"] == ONE_TARGET]
    stack = ServeProcess(tmp_path_factory.mktemp("one-target"), config)
    stack.start()
    yield stack
    stack.stop()
