"""`python -m verifier_service` and `python -m drafter_service` as real processes:
health, a drafter killed with SIGKILL mid-generation, and draining on SIGTERM."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from shared.loading import load_tokenizer
from shared.paths import models_dir
from shared.pb.specdec.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from tests.exactness import compare_greedy, humaneval_prompts
from tests.grpc_servers import health_status, spawn_service, wait_serving

pytestmark = pytest.mark.slow

TARGET = "codelm-target-s"


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(models_dir() / TARGET)
    return [tok(p).input_ids for p in humaneval_prompts(2)]


def generate(stub, prompt, method, max_new_tokens, on_chunk=None):
    request = verifier_pb2.VerifierGenerateRequest(
        model=TARGET, prompt_token_ids=prompt, max_new_tokens=max_new_tokens, method=method,
        num_speculative_tokens=4,
    )
    tokens, complete = [], None
    for i, resp in enumerate(stub.Generate(request, timeout=120)):
        kind = resp.WhichOneof("response")
        assert kind != "error", resp.error
        if kind == "chunk":
            tokens.extend(resp.chunk.token_ids)
            if on_chunk is not None:
                on_chunk(i)
        else:
            complete = resp.complete
    return tokens, complete


def test_drafter_killed_mid_generation_and_sigterm_drain(prompts):
    drafter, drafter_port = spawn_service("drafter_service")
    verifier = None
    try:
        verifier, verifier_port = spawn_service(
            "verifier_service", "--target", TARGET, "--drafter", f"127.0.0.1:{drafter_port}"
        )
        address = f"127.0.0.1:{verifier_port}"
        wait_serving(f"127.0.0.1:{drafter_port}")
        wait_serving(address)
        assert health_status(address, "specdec.v1.VerifierService") == 1
        channel = grpc.insecure_channel(address)
        stub = verifier_pb2_grpc.VerifierServiceStub(channel)

        # 1. Drafter SIGKILLed after a few chunks: the request completes with the right tokens.
        def kill_drafter(i):
            if i == 2:
                drafter.kill()

        max_new_tokens = 64
        tokens, complete = generate(stub, prompts[0], "draft_model", max_new_tokens, kill_drafter)
        assert drafter.wait(timeout=10) == -signal.SIGKILL
        cmp = compare_greedy(TARGET, prompts[0], tokens, max_new_tokens)
        assert cmp.ok, cmp
        assert complete.finish_reason == common_pb2.FINISH_REASON_LENGTH

        # 2. Drafter back on the same port: speculation resumes (first request after the
        #    retry interval may still run a few k = 0 rounds while it reconnects).
        drafter, port_again = spawn_service("drafter_service", port=drafter_port)
        assert port_again == drafter_port
        wait_serving(f"127.0.0.1:{drafter_port}")
        time.sleep(1.2)  # past the client's retry interval
        tokens, complete = generate(stub, prompts[1], "draft_model", 32)
        assert compare_greedy(TARGET, prompts[1], tokens, 32).ok
        assert complete.stats.num_draft_tokens > 0

        # 3. SIGTERM while a request is in flight: it finishes, new ones are refused, exit 0.
        refused = []

        def terminate(i):
            if i == 1:
                verifier.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                with pytest.raises(grpc.RpcError) as e:
                    generate(stub, prompts[1], "none", 4)
                refused.append(e.value.code())

        tokens, complete = generate(stub, prompts[0], "none", 128, terminate)
        assert refused == [grpc.StatusCode.UNAVAILABLE]
        assert complete.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert len(tokens) == 128
        assert verifier.wait(timeout=30) == 0
        channel.close()
    finally:
        for proc in (verifier, drafter):
            if proc is not None:
                _stop(proc)
