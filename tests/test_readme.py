"""The README's client snippet runs as written against a live server on its documented address."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cbmir.server.config import ServerConfig
from cbmir.server.startup import start_server
from tests.helpers import REPO, UNIFESP, require


def client_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    snippets = [b for b in blocks if "RetrievalClient(" in b]
    assert len(snippets) == 1, "the README should hold exactly one client snippet"
    return snippets[0]


def test_readme_client_snippet_runs_as_written(small_bundle: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 50051)) == 0:
            pytest.skip("port 50051, the README's address, is taken on this machine")
    running = start_server(ServerConfig(index=str(small_bundle), port=50051, device="cpu"), wait_ready=True)
    try:
        shutil.copy(require(UNIFESP) / "images" / "00000.png", tmp_path / "query.png")
        done = subprocess.run(
            [sys.executable, "-c", client_snippet()], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
    finally:
        running.stop(0)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("90 images; methods")
    header, *rows = lines[1:-1]
    assert header.split()[:3] == ["rank", "distance", "id"] and "label" in header.split()
    assert len(rows) == 5 and all("Chest" in row.split() for row in rows)
    assert lines[-1].startswith("NOT_FOUND archive id 'not-an-archived-id'")
