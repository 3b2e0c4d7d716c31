"""TLS on every hop through a real `specdec serve` (throwaway certificates from trustme):
the public gRPC port and HTTPS serve the public certificate, router, verifier and drafter
pool talk mutual TLS under an internal CA, plaintext clients are refused, and a peer
without a certificate of the internal CA is never talked to."""

from __future__ import annotations

import asyncio
import ssl

import grpc
import httpx
import pytest
import trustme

from router.client import ClientError, SpecdecClient
from router.server import wait_for_health
from router.stack import ServeProcess
from shared.config import TlsConfig, default_config
from shared.serving import HealthReporter
from shared.tls import add_port, internal_channel_credentials, internal_server_credentials
from tests.exactness import compare_greedy, humaneval_prompts
from tests.integration.test_service import _tokenize

pytestmark = pytest.mark.slow

MODEL = "codelm-target-s"


def write_pki(directory) -> dict[str, str]:
    """A public CA + server cert and an internal CA + one cert for every service."""
    public_ca, internal_ca = trustme.CA(), trustme.CA()
    files = {}
    for name, ca in (("public", public_ca), ("internal", internal_ca)):
        cert = ca.issue_cert("127.0.0.1", "localhost")
        files[f"{name}_ca"] = str(directory / f"{name}-ca.pem")
        ca.cert_pem.write_to_path(files[f"{name}_ca"])
        files[f"{name}_cert"] = str(directory / f"{name}-cert.pem")
        cert.cert_chain_pems[0].write_to_path(files[f"{name}_cert"])
        files[f"{name}_key"] = str(directory / f"{name}-key.pem")
        cert.private_key_pem.write_to_path(files[f"{name}_key"])
    return files


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pki):
    config = default_config().model_dump(mode="json")
    config["targets"] = [t for t in config["targets"] if t["name"] == MODEL]
    config["drafters"] = [d for d in config["drafters"] if d["kind"] == "draft_model"]
    config.update(router_port=0, http_port=0)
    config["tls"] = {"cert_file": pki["public_cert"], "key_file": pki["public_key"],
                     "internal_ca_file": pki["internal_ca"], "internal_cert_file": pki["internal_cert"],
                     "internal_key_file": pki["internal_key"]}  # fmt: skip
    stack = ServeProcess(tmp_path_factory.mktemp("tls"), config)
    stack.start()
    yield stack
    stack.stop()


def test_tls_client_gets_exact_tokens_over_mtls_internal_hops(stack, pki):
    prompt = humaneval_prompts(1, offset=4)[0]
    with SpecdecClient(stack.grpc_address, ca_file=pki["public_ca"]) as client:
        done = client.generate(MODEL, prompt, max_new_tokens=24, method="draft_model", num_speculative_tokens=3)
        ids = _tokenize(MODEL, prompt)
        assert compare_greedy(MODEL, ids, done.token_ids, 24).ok
        assert done.stats["num_draft_tokens"] > 0  # the drafter pool answered over mTLS


def test_plaintext_and_wrong_ca_clients_are_refused(stack, pki):
    with SpecdecClient(stack.grpc_address, attempts=1, timeout_s=5) as plain:
        with pytest.raises(ClientError) as e:
            plain.models()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    with SpecdecClient(stack.grpc_address, ca_file=pki["internal_ca"], attempts=1, timeout_s=5) as wrong:
        with pytest.raises(ClientError):
            wrong.models()


def test_https_serves_the_public_certificate(stack, pki):
    url = stack.http_url.replace("http://", "https://")
    with httpx.Client(verify=ssl.create_default_context(cafile=pki["public_ca"])) as client:
        assert client.get(f"{url}/v1/models").status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{stack.http_url}/v1/models", timeout=5)  # plaintext HTTP on the TLS port


def test_internal_peers_must_hold_a_certificate_of_the_internal_ca(tmp_path, pki):
    """A 'replica' whose certificate another CA signed is never healthy to the router's
    mTLS channel; one the internal CA signed is."""
    rogue = write_pki(tmp_path)  # same shape, other CAs
    good_tls = TlsConfig(internal_ca_file=pki["internal_ca"], internal_cert_file=pki["internal_cert"],
                         internal_key_file=pki["internal_key"])  # fmt: skip
    rogue_tls = TlsConfig(internal_ca_file=rogue["internal_ca"], internal_cert_file=rogue["internal_cert"],
                          internal_key_file=rogue["internal_key"])  # fmt: skip

    async def serving(tls: TlsConfig):
        server = grpc.aio.server()
        health = HealthReporter(server, ["specdec.v1.VerifierService"])
        await health.set(True)
        port = add_port(server, "127.0.0.1:0", internal_server_credentials(tls))
        await server.start()
        return server, f"127.0.0.1:{port}"

    async def main():
        creds = internal_channel_credentials(good_tls)
        server, address = await serving(good_tls)
        await wait_for_health(address, 5, credentials=creds)
        await server.stop(None)
        server, address = await serving(rogue_tls)
        with pytest.raises(TimeoutError):
            await wait_for_health(address, 3, credentials=creds)
        await server.stop(None)

    asyncio.run(main())
