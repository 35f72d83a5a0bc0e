import json

import numpy as np
import pytest

from cbmir.cli import main
from cbmir.evaluation.metrics import precision_at_k
from cbmir.evaluation.protocols import evaluate
from cbmir.evaluation.report import worst_classes_table
from cbmir.index_build import load_bundle
from cbmir.server.search_engine import SearchEngine


def test_leave_one_out_with_patient_exclusion_matches_manual_computation(small_bundle):
    bundle = load_bundle(small_bundle)
    doc = evaluate(bundle, ["hog", "cnn+hog"], ["label"], exclude_same="patient_id", device="cpu", progress=False)
    by_method = {r["method"]: r for r in doc["results"]}
    assert by_method["hog"]["queries"] == 90 and len(by_method["hog"]["mP@k"]) == 10

    engine = SearchEngine(bundle, device="cpu")
    patients = np.asarray(bundle.metadata["patient_id"])
    labels = np.asarray(bundle.metadata["label"])
    hog = bundle.methods["hog"].descriptors
    precisions = []
    for i in range(len(bundle)):
        allowed = patients != patients[i]
        res = engine.search("hog", hog[i : i + 1], 10, allowed=allowed)
        assert i not in res.rows[0]
        precisions.append(precision_at_k((labels[res.rows[0]] == labels[i])[None])[0])
    np.testing.assert_allclose(by_method["hog"]["mP@k"], np.mean(precisions, axis=0), atol=1e-6)
    assert by_method["hog"]["seed_mAP"] == round(float(np.mean(precisions)), 6)
    # cnn+hog by brute force: the 10 nearest other-patient images by L2 on cnn, re-ordered by L1 on hog
    cnn = bundle.methods["cnn"].descriptors
    reranked = []
    for i in range(len(bundle)):
        others = np.flatnonzero(patients != patients[i])
        l2 = np.linalg.norm(cnn[others] - cnn[i], axis=1)
        candidates = others[np.argsort(l2, kind="stable")[:10]]
        order = np.argsort(np.abs(hog[candidates] - hog[i]).sum(axis=1), kind="stable")
        reranked.append(precision_at_k((labels[candidates[order]] == labels[i])[None])[0])
    assert by_method["cnn+hog"]["seed_mAP"] == pytest.approx(float(np.mean(reranked)), abs=2e-6)
    # chance: per query, relevant share of the images it may retrieve (other patients), averaged
    shares = [
        np.count_nonzero((labels == labels[i]) & (patients != patients[i])) / np.count_nonzero(patients != patients[i])
        for i in range(len(bundle))
    ]
    assert by_method["hog"]["chance_P@k"] == round(float(np.mean(shares)), 6)


def test_chance_baseline_without_exclusion_is_the_class_share(small_bundle, capsys):
    bundle = load_bundle(small_bundle)
    doc = evaluate(bundle, ["hog"], ["label"], device="cpu", progress=False)
    assert doc["results"][0]["chance_P@k"] == round(29 / 89, 6)  # 3 labels x 30 images, the query left out
    assert main(["eval", "--index", str(small_bundle), "--methods", "hog", "--no-progress"]) == 0
    assert "| chance (random ranking) | label | 90 | 0.3258 | 0.3258 | 0.3258 | n/a |" in capsys.readouterr().out


def test_cli_eval_writes_json_and_cli_errors_are_clean(small_bundle, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        [
            "eval",
            "--index",
            str(small_bundle),
            "--methods",
            "cnn,bovw",
            "--relevance",
            "label,modality",
            "--json",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert {(r["method"], r["relevance"]) for r in doc["results"]} == {
        ("cnn", "label"),
        ("cnn", "modality"),
        ("bovw", "label"),
        ("bovw", "modality"),
    }
    modality = [r for r in doc["results"] if r["relevance"] == "modality"]
    assert all(r["seed_mAP"] == 1.0 for r in modality)  # every UNIFESP image is CR
    assert "| cnn | label |" in capsys.readouterr().out
    assert main(["eval", "--index", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_external_query_set_is_described_by_the_bundles_extractors(small_bundle, unifesp_subset, tmp_path):
    import csv

    root, labels = unifesp_subset
    with open(labels, newline="") as fh:
        rows = list(csv.DictReader(fh))
    queries_csv = tmp_path / "queries.csv"
    with open(queries_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[::9])  # 10 of the archived images, re-described from their files
    from cbmir.index_build import open_archive

    doc = evaluate(
        load_bundle(small_bundle),
        ["hog"],
        ["label"],
        queries=open_archive(root, queries_csv),
        device="cpu",
        progress=False,
    )
    result = doc["results"][0]
    assert doc["config"]["protocol"] == "external queries" and result["queries"] == 10
    # Each query is itself in the archive: its own copy ranks first, so P@1 is exactly 1.
    assert result["mP@k"][0] == 1.0 and result["describe_s"] > 0


def test_eval_reports_per_class_precision_and_the_worst_queries(small_bundle):
    bundle = load_bundle(small_bundle)
    result = evaluate(bundle, ["hog"], ["label"], device="cpu", progress=False)["results"][0]
    per_class = result["per_class"]
    assert set(per_class) == {"Chest", "Knee", "Abdomen"} and sum(c["queries"] for c in per_class.values()) == 90
    weighted = sum(c["P@1"] * c["queries"] for c in per_class.values()) / 90
    assert weighted == pytest.approx(result["mP@k"][0], abs=1e-5)
    worst = result["worst"]
    assert len(worst) == 12 and [w["P@10"] for w in worst] == sorted(w["P@10"] for w in worst)
    labels = dict(zip(bundle.ids, bundle.metadata["label"]))
    for w in worst:
        assert w["class"] == labels[w["id"]] and len(w["hits"]) == 10 and w["id"] not in {h["id"] for h in w["hits"]}
        assert w["P@10"] == sum(h["class"] == w["class"] for h in w["hits"]) / 10
    confusion = result["confusion"]
    assert set(confusion) == set(per_class)
    for cls, shares in confusion.items():
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
        assert shares.get(cls, 0.0) == pytest.approx(per_class[cls]["P@10"], abs=1e-5)
        assert list(shares.values()) == sorted(shares.values(), reverse=True)


def test_report_lists_each_methods_worst_classes_with_their_main_confusion(small_bundle, tmp_path):
    doc = evaluate(load_bundle(small_bundle), ["hog", "cnn"], ["label"], device="cpu", progress=False)
    path = tmp_path / "unifesp.json"
    path.write_text(json.dumps(doc))
    table = worst_classes_table(path, "label", count=2)
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| hog") or line.startswith("| cnn")]
    assert [r[0] for r in rows] == ["| hog", "| hog", "| cnn", "| cnn"]
    for result in doc["results"]:
        lowest = sorted(result["per_class"].items(), key=lambda item: (item[1]["P@10"], item[0]))[:2]
        shown = [r for r in rows if r[0] == f"| {result['method']}"]
        assert [r[1] for r in shown] == [cls for cls, _ in lowest]
        for r, (cls, _) in zip(shown, lowest):
            others = {c: v for c, v in result["confusion"][cls].items() if c != cls}
            if others:
                assert r[5].startswith(max(others, key=others.get))
