"""A bad configuration stops every entry point with one clear line and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.paths import PROJECT_ROOT

BAD = {
    "missing file": None,
    "not YAML": "targets: [unclosed",
    "missing field": "targets: [{name: x}]\n",
    "wrong type": "targets: []\nrouter_port: many\n",
    "unknown key": "targets: [{name: x, model_dir: /tmp}]\nflux_capacitor: 1\n",
    "negative limit": "limits: {max_body_bytes: -1}\n",
    "bad rate limit": "auth: {rate_limit: 'fast please'}\n",
    "half a TLS pair": "tls: {cert_file: /etc/hostname}\n",
}
ENTRY_POINTS = {
    "specdec serve": ["-m", "router.cli", "serve"],
    "verifier": ["-m", "verifier_service", "--target", "x"],
    "drafter pool": ["-m", "drafter_service"],
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_bad_config_exits_2_with_one_clear_line(tmp_path, case, entry):
    path = tmp_path / "cfg.yaml"
    if BAD[case] is not None:
        path.write_text(BAD[case])
    out = subprocess.run([sys.executable, *ENTRY_POINTS[entry], "--config", str(path)], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "configuration error" in out.stderr and "Traceback" not in out.stderr
