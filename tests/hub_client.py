"""The Hub client side of the tests: the real ``huggingface_hub`` client, run against the fake Hub server
(:mod:`fake_hub_server`).

``HF_ENDPOINT`` is read by ``huggingface_hub`` when it is imported, so every client runs in a fresh
Python process with an environment pointing at the fake Hub and a temporary ``HF_HOME``; the pytest
process itself never imports ``huggingface_hub`` with a changed endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fake_hub_server import FakeHub

RESULT_MARKER = "@@RESULT@@"
TEST_TOKEN = "hf_double_token"

# Printed by client scripts: ``emit({...})`` sends a JSON result back to the test.
CLIENT_PRELUDE = f"""
import json as _json
def emit(result):
    print({RESULT_MARKER!r} + _json.dumps(result), flush=True)
"""


def client_env(hub: FakeHub, hf_home: Path) -> dict[str, str]:
    """The environment of a client process: the fake Hub as endpoint, an empty cache, no Xet."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k not in ("TRANSFORMERS_CACHE", "TRANSFORMERS_OFFLINE")}
    env.update({
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(hf_home),
        "HF_TOKEN": TEST_TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(proxy, None)
    return env


def run_client(hub: FakeHub, hf_home: Path, script: str, timeout: float = 300) -> dict:
    """Run ``script`` in a fresh Python process pointed at ``hub``; return what it passed to ``emit``.

    Raises AssertionError with the process output when it fails or emits nothing.
    """
    code = CLIENT_PRELUDE + textwrap.dedent(script)
    completed = subprocess.run(
        [sys.executable, "-c", code], env=client_env(hub, hf_home), capture_output=True, text=True,
        timeout=timeout, cwd=str(Path(__file__).resolve().parent.parent),
    )
    results = [line[len(RESULT_MARKER):] for line in completed.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if completed.returncode != 0 or not results:
        raise AssertionError(
            f"client process failed (exit {completed.returncode})\n--- stdout ---\n{completed.stdout[-4000:]}"
            f"\n--- stderr ---\n{completed.stderr[-6000:]}"
        )
    return json.loads(results[-1])
