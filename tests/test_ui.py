"""The results page in a real headless Chromium (Debian's package, driven by Playwright): upload, grid, click a
hit, errors shown, metadata escaped, the token never in the browser, the evaluation view."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cbmir.client import RetrievalClient
from cbmir.evaluation.protocols import evaluate
from cbmir.index_build import build_bundle, load_bundle, open_archive
from cbmir.server.config import ServerConfig
from cbmir.server.startup import start_server
from tests.helpers import UNIFESP

TOKEN = "ui-test-token-0123456789"
SCRIPT = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: make setup installs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def hostile_bundle(unifesp_subset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 90-image subset, its first image's metadata carrying markup that must render as text."""
    root, labels = unifesp_subset
    folder = tmp_path_factory.mktemp("ui")
    with open(labels, newline="") as fh:
        rows = list(csv.DictReader(fh))
    marked = min(row["path"] for row in rows)
    for row in rows:
        row["note"] = SCRIPT if row["path"] == marked else "plain"
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    build_bundle(open_archive(root, folder / "labels.csv"), folder / "b", {"hog": {}}, device="cpu", progress=False)
    return folder / "b"


@contextmanager
def _served_page(bundle: Path, tokens: Path | None = None, eval_doc: dict | None = None) -> Iterator[tuple[str, str]]:
    """A real cbmir server on the bundle and the page's application in front of it: (page URL, server target)."""
    import uvicorn

    from cbmir.ui.app import UiConfig, create_app

    running = start_server(
        ServerConfig(index=str(bundle), port=0, device="cpu", tokens_file=str(tokens) if tokens else None),
        wait_ready=True,
    )
    target = f"127.0.0.1:{running.port}"
    app = create_app(
        RetrievalClient(target, token=TOKEN if tokens else None), UiConfig(max_upload_mb=1, eval_doc=eval_doc)
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", target
    finally:
        server.should_exit = True
        thread.join(10)
        running.stop(0)


@pytest.fixture(scope="module")
def page_url(hostile_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"search {TOKEN}\n")
    doc = evaluate(load_bundle(hostile_bundle), ["hog"], ["label"], device="cpu", progress=False)
    with _served_page(hostile_bundle, tokens, doc) as served:
        yield served


@pytest.fixture(scope="module")
def classifying_page(
    unifesp_subset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A cnn bundle whose checkpoint carries a nearest-centroid classification head over the 3 body parts."""
    import numpy as np

    from cbmir.extractors import create_extractor
    from cbmir.training.dataset import decode_archive
    from cbmir.training.trainer import TrainResult, save_checkpoint

    data = decode_archive(open_archive(*unifesp_subset), progress=False)
    extractor = create_extractor("cnn", model="test_efficientnet", weights="random", image_size=48, device="cpu")
    raw = extractor.extract(data.images)
    labels = np.asarray(data.column("label"))
    classes = sorted(set(labels))
    centroids = np.stack([raw[labels == c].mean(axis=0) for c in classes])
    sharpness = 1000.0  # logits -sharpness/2 * |x - c|^2 (+ a per-query constant): confident at any random init
    extractor.set_head(centroids * sharpness, -sharpness / 2 * (centroids**2).sum(axis=1))
    folder = tmp_path_factory.mktemp("classifying")
    ckpt = save_checkpoint(TrainResult(extractor, classes), folder / "head.pt")
    config = {"model": "test_efficientnet", "weights": str(ckpt), "image_size": 48}
    build_bundle(open_archive(*unifesp_subset), folder / "b", {"cnn": config}, device="cpu", progress=False)
    with _served_page(folder / "b") as served:
        yield served


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_upload_shows_the_hits_of_a_direct_query_and_a_click_searches_from_a_hit(page_url, browser) -> None:
    url, target = page_url
    page = browser.new_page()
    seen: list[str] = []
    page.on("response", lambda r: seen.append(r.text() if r.url.endswith(("/", "/api/info", "/api/search")) else ""))
    page.goto(url)
    page.wait_for_selector("#method option", state="attached")
    page.fill("#k", "8")
    image = UNIFESP / "images" / "00003.png"
    page.set_input_files("#file", str(image))
    page.wait_for_function("document.querySelectorAll('.hit').length === 8")
    direct = RetrievalClient(target, token=TOKEN).search_image(image.read_bytes(), k=8, method="hog")
    cards = page.query_selector_all(".hit")
    assert cards[0].query_selector(".id").inner_text() == direct[0].id
    assert cards[0].query_selector(".distance").inner_text() == f"{direct[0].distance:.4f}"
    assert [c.get_attribute("data-id") for c in cards] == [h.id for h in direct]
    page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)")
    assert len(page.query_selector_all(".hit img")) == 8  # every thumbnail rendered from GetThumbnails
    assert "extract" in page.inner_text("#timings")

    clicked = direct[1].id
    cards[1].click()
    page.wait_for_function(f"document.querySelector('#query h3').textContent.includes({json.dumps(clicked)})")
    page.wait_for_function("document.querySelectorAll('.hit').length === 8")
    neighbours = RetrievalClient(target, token=TOKEN).search_id(clicked, k=8, method="hog")
    assert [c.get_attribute("data-id") for c in page.query_selector_all(".hit")] == [h.id for h in neighbours]
    assert all(TOKEN not in body for body in seen), "the server's token reached the browser"
    page.close()


def test_markup_in_metadata_renders_as_text(page_url, browser, hostile_bundle: Path) -> None:
    url, _ = page_url
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#method option", state="attached")
    bundle = load_bundle(hostile_bundle)
    first = next(i for i, note in zip(bundle.ids, bundle.metadata["note"]) if note == SCRIPT)
    page.set_input_files("#file", str(UNIFESP / first))  # its own record is the first hit, note included
    page.wait_for_selector(".hit")
    assert SCRIPT in page.inner_text("#grid")
    time.sleep(0.2)  # an injected onerror handler would have run by now
    assert page.evaluate("window.pwned") is None
    page.close()


def test_bad_and_oversized_uploads_show_the_reason(page_url, browser, tmp_path: Path) -> None:
    url, _ = page_url
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#method option", state="attached")
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"this is not an image")
    page.set_input_files("#file", str(bogus))
    page.wait_for_function("document.querySelector('#error').textContent.length > 0")
    assert page.inner_text("#error").startswith("INVALID_ARGUMENT: query image: cannot decode image")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(2 * 1024 * 1024))
    page.set_input_files("#file", str(big))
    page.wait_for_function("document.querySelector('#error').textContent.includes('limit of 1 MB')")
    page.close()


def test_evaluation_view_lists_classes_and_worst_queries(page_url, browser) -> None:
    url, _ = page_url
    page = browser.new_page()
    page.goto(url + "/eval")
    page.wait_for_selector("table tr td")
    rows = page.query_selector_all("table tr")
    assert len(rows) == 1 + 3  # header + Chest, Knee, Abdomen
    assert len(page.query_selector_all(".row")) == 12 and len(page.query_selector_all(".cell.query")) == 12
    page.close()


def test_group_by_and_distance_cut_off_from_the_page(page_url, browser) -> None:
    url, target = page_url
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#group-by option[value=patient_id]", state="attached")
    page.fill("#k", "5")
    page.select_option("#group-by", "patient_id")
    page.fill("#group-size", "2")
    image = UNIFESP / "images" / "00003.png"
    page.set_input_files("#file", str(image))
    page.wait_for_selector(".hit")
    direct = RetrievalClient(target, token=TOKEN).search_image(
        image.read_bytes(), k=5, method="hog", group_by="patient_id", group_size=2
    )
    assert [c.get_attribute("data-id") for c in page.query_selector_all(".hit")] == [h.id for h in direct]
    assert [g.inner_text() for g in page.query_selector_all(".hit .group")] == [h.group for h in direct]
    cut = direct[2].distance
    page.select_option("#group-by", "")
    page.fill("#max-distance", f"{cut:.6f}")
    page.fill("#k", "50")
    with page.expect_response(lambda r: r.url.endswith("/api/search")):
        page.click("#search")
    page.wait_for_function("document.querySelectorAll('.hit .group').length === 0")
    within = RetrievalClient(target, token=TOKEN).search_image(image.read_bytes(), k=50, method="hog", max_distance=cut)
    assert [c.get_attribute("data-id") for c in page.query_selector_all(".hit")] == [h.id for h in within]
    assert all(h.distance <= cut for h in within) and len(within) < 50
    page.close()


def test_query_expansion_and_reciprocal_re_ranking_from_the_page(page_url, browser) -> None:
    url, target = page_url
    image = UNIFESP / "images" / "00003.png"
    client = RetrievalClient(target, token=TOKEN)
    plain = client.search_image(image.read_bytes(), k=10, method="hog")
    expanded = client.search_image(image.read_bytes(), k=10, method="hog", expand=3, reciprocal_k1=8)
    assert [h.id for h in expanded] != [h.id for h in plain]  # the options change this query's ranking
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#method option", state="attached")
    assert page.is_hidden("#class-controls")  # HOG has no classifier: no class-predicted search offered
    page.fill("#k", "10")
    page.fill("#expand", "3")
    page.fill("#reciprocal", "8")
    page.set_input_files("#file", str(image))
    page.wait_for_function("document.querySelectorAll('.hit').length === 10")
    assert [c.get_attribute("data-id") for c in page.query_selector_all(".hit")] == [h.id for h in expanded]
    page.fill("#expand", "-1")
    with page.expect_response(lambda r: r.url.endswith("/api/search")):
        page.click("#search")
    page.wait_for_function("document.querySelector('#error').textContent.length > 0")
    assert page.inner_text("#error") == "expand must be 0 (off) or the number of hits to expand with, got -1"
    page.close()


def test_class_predicted_search_with_a_neighbour_vote_from_the_page(classifying_page, browser) -> None:
    url, target = classifying_page
    image = UNIFESP / "images" / "00003.png"
    client = RetrievalClient(target)
    direct = client.search_image(image.read_bytes(), k=6, predict_class=True, class_vote=5)
    predicted = client.last_predicted_class
    assert predicted in ("Abdomen", "Chest", "Knee", "")  # "": no class reached the confidence threshold
    assert not predicted or all(h.metadata["label"] == predicted for h in direct)
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#method option", state="attached")
    assert page.is_visible("#class-controls")
    page.check("#predict-class")
    page.fill("#class-vote", "5")
    page.fill("#k", "6")
    page.set_input_files("#file", str(image))
    page.wait_for_selector(".predicted")
    shown = "no class reached the confidence threshold: the whole archive was searched"
    assert page.inner_text(".predicted") == (f"predicted class: {predicted}" if predicted else shown)
    assert [c.get_attribute("data-id") for c in page.query_selector_all(".hit")] == [h.id for h in direct]
    page.close()


def test_a_malformed_number_is_a_one_line_error_naming_the_field(page_url) -> None:
    import urllib.error
    import urllib.request

    url, _ = page_url
    body = '--b\r\nContent-Disposition: form-data; name="archive_id"\r\n\r\nimages/00003.png\r\n'
    body += '--b\r\nContent-Disposition: form-data; name="k"\r\n\r\nten\r\n--b--\r\n'
    request = urllib.request.Request(
        url + "/api/search", data=body.encode(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    assert json.loads(caught.value.read()) == {"error": "k must be a whole number, got 'ten'"}
