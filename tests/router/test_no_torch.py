"""The router's request path, the CLI and the client module import no torch: a router process needs no
model runtime, and `specdec generate` starts fast."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from shared.paths import PROJECT_ROOT

SCRIPT = textwrap.dedent(
    """
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch.") or name == "transformers":
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())

    import router.cli, router.client, router.http, router.server, router.validation
    from router.cli import build_parser, build_request
    from router.http import CompletionRequest, create_app, to_generate_request
    from router.server import Router
    from router.validation import ModelSpec
    from shared.pb.specdec.v1 import router_pb2

    spec = ModelSpec("m", max_context=256, max_new_tokens=64, vocab_size=4096, methods=("none", "ngram"))
    router = Router([spec], tokenize=lambda model, text: [ord(c) % 4096 for c in text])
    create_app(router)

    # gRPC, HTTP and CLI requests, each through the router's validation
    grpc_request = router_pb2.GenerateRequest(model="m", max_new_tokens=8, method="ngram")
    grpc_request.token_ids.token_ids.extend([1, 2, 3])
    grpc_request.sampling.temperature = 0.7
    http_request = to_generate_request(
        CompletionRequest(model="m", prompt="def f", max_tokens=8, temperature=0.7, top_p=0.9), "r1"
    )
    cli_args = build_parser().parse_args(
        ["generate", "--model", "m", "--prompt", "def f", "--temperature", "0.7", "--seed", "1"]
    )
    for request in (grpc_request, http_request, build_request(cli_args)):
        validated = router.validate(request)
        assert validated.to_verifier().sampling.temperature > 0.69
    assert "torch" not in sys.modules, "torch was imported"
    print("ok")
    """
)


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )


def test_router_request_path_imports_no_torch():
    out = _run(SCRIPT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_blocker_catches_a_torch_import():
    """The test above can fail: the same blocker stops a module that imports torch."""
    script = SCRIPT.replace("import router.cli,", "import shared.sampling, router.cli,")
    assert script != SCRIPT
    out = _run(script)
    assert out.returncode != 0 and "blocked" in out.stderr
