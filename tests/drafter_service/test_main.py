"""`python -m drafter_service` as a process: port announcement, health, SIGTERM."""

from __future__ import annotations

import signal

import pytest

from tests.grpc_servers import health_status, spawn_service, wait_serving

pytestmark = pytest.mark.slow


def test_announces_port_reports_health_and_stops_on_sigterm():
    import urllib.request

    proc, port = spawn_service("drafter_service", "--grace", "2", "--metrics-port", "0")
    try:
        # /metrics on a port it bound itself (0: any) and announced before LISTENING
        assert proc.metrics_port not in (None, 0, port)
        body = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read()
        assert b"specdec" in body
        address = f"127.0.0.1:{port}"
        seen = wait_serving(address)
        assert seen[-1] == 1  # SERVING (NOT_SERVING before it, unless loading beat the first poll)
        assert health_status(address, "specdec.v1.DrafterService") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _target_with_extra_token(tmp_path, source):
    """A copy of a target's config and tokenizer whose tokenizer.json has one more token."""
    import json
    import shutil

    out = tmp_path / "codelm-target-x"
    out.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    tok = json.loads((source / "tokenizer.json").read_text())
    tok["added_tokens"].append({
        "id": len(tok["model"]["vocab"]), "content": "<|extra|>", "single_word": False,
        "lstrip": False, "rstrip": False, "normalized": False, "special": True,
    })  # fmt: skip
    (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


def test_tokenizer_mismatch_is_a_startup_error_naming_both_hashes(tmp_path):
    import subprocess
    import sys

    import yaml

    from shared.config import default_config
    from shared.loading import tokenizer_hash
    from shared.paths import PROJECT_ROOT

    config = default_config()
    sorted_drafter = next(d for d in config.drafters if d.kind == "sorted")
    odd = _target_with_extra_token(tmp_path, config.target("codelm-target-s").model_dir)
    data = config.model_dump(mode="json")
    data["targets"].append({"name": "codelm-target-x", "model_dir": str(odd)})
    data["drafters"] = [sorted_drafter.model_dump(mode="json")]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [sys.executable, "-m", "drafter_service", "--config", str(tmp_path / "cfg.yaml"), "--port", "0"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "LISTENING" not in proc.stdout  # refused before binding a port
    message = proc.stderr
    assert "configuration error" in message
    for part in ("codelm-sorted", "codelm-target-x", tokenizer_hash(odd),
                 tokenizer_hash(sorted_drafter.model_dir)):  # fmt: skip
        assert part in message, (part, message)
