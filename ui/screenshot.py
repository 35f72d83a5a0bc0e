"""Screenshots of the page for the documentation, taken in Debian's headless Chromium (needs the dev extra).

    python -m cbmir.ui.screenshot --target 127.0.0.1:50051 --image QUERY.png --out docs/ui-search.png \\
        [--eval RESULT.json --eval-out docs/ui-eval.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import threading
import time
from pathlib import Path

from cbmir.client import RetrievalClient

from .app import UiConfig, create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of a running cbmir serve")
    parser.add_argument("--image", required=True, help="query image to upload")
    parser.add_argument("--out", required=True, help="PNG file of the search page")
    parser.add_argument("--k", type=int, default=12, help="hits shown")
    parser.add_argument("--method", default="", help="method to search with (default: the server's)")
    parser.add_argument("--eval", help="cbmir eval --json result for the evaluation view")
    parser.add_argument("--eval-out", help="PNG file of the evaluation view")
    args = parser.parse_args(argv)

    import uvicorn
    from playwright.sync_api import sync_playwright

    eval_doc = json.loads(Path(args.eval).read_text()) if args.eval else None
    app = create_app(RetrievalClient(args.target), UiConfig(eval_doc=eval_doc))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#method option", state="attached")
            if args.method:
                page.select_option("#method", args.method)
            page.fill("#k", str(args.k))
            page.set_input_files("#file", args.image)
            page.wait_for_function(f"document.querySelectorAll('.hit').length === {args.k}")
            page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete)")
            page.screenshot(path=args.out, full_page=True)
            if args.eval and args.eval_out:
                page.goto(f"http://127.0.0.1:{port}/eval")
                page.wait_for_selector("table tr td")
                time.sleep(1.0)
                page.screenshot(path=args.eval_out, full_page=False)
            browser.close()
    finally:
        server.should_exit = True
    print(f"wrote {args.out}" + (f" and {args.eval_out}" if args.eval_out else ""))


if __name__ == "__main__":
    main()
