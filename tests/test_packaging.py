"""`pip install cbmir` (no extras) is the client alone: it queries a real server and has no torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cbmir.server.config import ServerConfig
from cbmir.server.startup import start_server
from tests.helpers import REPO, UNIFESP, require

CLIENT_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    from cbmir.client import RetrievalClient
    image = open(sys.argv[2], "rb").read()
    with RetrievalClient(sys.argv[1], timeout=60) as client:
        hits = client.search_image(image, k=3, method="hog")
        health = client.health()
    print(json.dumps({"ids": [h.id for h in hits], "health": health,
                      "absent": [m for m in ("torch", "numpy", "faiss", "cv2") if importlib.util.find_spec(m) is None]}))
    """
)


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install .` (no extras), from a copy of the sources (no editable link)."""
    root = tmp_path_factory.mktemp("slim")
    src = root / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "bundles", "models", "logs", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache", "build"
        ),
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return python


def test_plain_install_queries_a_server_without_torch(slim_venv: Path, small_bundle: Path) -> None:
    import json

    from cbmir.index_build import load_bundle

    running = start_server(ServerConfig(index=str(small_bundle), port=0, device="cpu"), wait_ready=True)
    try:
        image = require(UNIFESP) / "images" / load_bundle(small_bundle).ids[0].split("/")[-1]
        out = subprocess.run(
            [str(slim_venv), "-c", CLIENT_SCRIPT, f"127.0.0.1:{running.port}", str(image)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=slim_venv.parent,
        )
    finally:
        running.stop(0)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["absent"] == ["torch", "numpy", "faiss", "cv2"]
    assert result["health"] == "SERVING" and len(result["ids"]) == 3
    cli = subprocess.run(
        [str(slim_venv.parent / "cbmir"), "query", "--help"], capture_output=True, text=True, cwd=slim_venv.parent
    )
    assert cli.returncode == 0 and "--target" in cli.stdout, cli.stderr[-2000:]
