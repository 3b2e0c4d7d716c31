"""The router's request path and the CLI client import no torch: a router process needs no
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

    import router.cli, router.http, router.server, router.validation
    from router.validation import ModelSpec, validate_request
    from shared.pb.specdec.v1 import router_pb2

    spec = ModelSpec("m", max_context=256, max_new_tokens=64, vocab_size=4096, methods=("none", "ngram"))
    request = router_pb2.GenerateRequest(model="m", max_new_tokens=8, method="ngram")
    request.token_ids.token_ids.extend([1, 2, 3])
    request.sampling.temperature = 0.7
    validated = validate_request(request, {"m": spec}, tokenize=None)
    assert validated.to_verifier().sampling.temperature > 0.69
    assert "torch" not in sys.modules, "torch was imported"
    print("ok")
    """
)


def test_router_request_path_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_blocker_catches_a_torch_import():
    """The test above can fail: the same blocker stops a module that imports torch."""
    script = SCRIPT.replace("import router.cli, router.http, router.server, router.validation", "import shared.sampling")
    out = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "blocked" in out.stderr
