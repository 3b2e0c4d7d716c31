"""router/cli.py: the client path stays light (no torch/transformers) and builds the request."""

from __future__ import annotations

import json
import subprocess
import sys

from shared.paths import PROJECT_ROOT

_CHECK = r"""
import json, sys
import router.cli as cli
args = cli.build_parser().parse_args([
    "generate", "--model", "codelm-target-m", "--prompt", "def f(x):", "--method", "ngram",
    "--max-new-tokens", "12", "--temperature", "0.5", "--seed", "7", "--json",
])
req = cli.build_request(args)
heavy = sorted(m for m in ("torch", "transformers", "numpy", "router.server", "router.http")
               if m in sys.modules)
print(json.dumps({"heavy": heavy, "model": req.model, "text": req.text, "method": req.method,
                  "max_new_tokens": req.max_new_tokens, "seed": req.sampling.seed,
                  "has_seed": req.sampling.HasField("seed"),
                  "temperature": round(req.sampling.temperature, 3)}))
"""


def test_generate_path_imports_no_torch_and_builds_request():
    # A fresh interpreter: what `specdec generate` imports before its first RPC.
    out = subprocess.run(
        [sys.executable, "-c", _CHECK], cwd=PROJECT_ROOT, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got.pop("heavy") == []
    assert got == {
        "model": "codelm-target-m", "text": "def f(x):", "method": "ngram",
        "max_new_tokens": 12, "seed": 7, "has_seed": True, "temperature": 0.5,
    }  # fmt: skip


def test_no_seed_leaves_seed_unset():
    from router import cli

    args = cli.build_parser().parse_args(["generate", "--model", "m", "--prompt", "p"])
    req = cli.build_request(args)
    assert not req.sampling.HasField("seed")
    assert not req.HasField("num_speculative_tokens")
    assert req.max_new_tokens == 64 and req.sampling.temperature == 0.0


def test_unreachable_server_exits_1():
    # No server on this port: a clear error on stderr and exit status 1, not a traceback.
    from router.serve import free_port

    out = subprocess.run(
        [sys.executable, "-m", "router.cli", "generate", "--model", "m", "--prompt", "p",
         "--server", f"127.0.0.1:{free_port()}", "--timeout", "3"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "error: UNAVAILABLE" in out.stderr or "DEADLINE_EXCEEDED" in out.stderr
