import json

from rich.console import Console

from cammsr.evaluate.report import markdown_table, metrics_table


def test_tables_show_every_ranker_in_a_fixed_order(tmp_path):
    part = {"hr@10": 0.5, "ndcg@10": 0.25}
    metrics = {  # written with sorted keys, as write_json_atomic does: the tables order them themselves
        "by_target_popularity": {"tail": {"users": 1}}, "fusion_beta": {"model+text_knn": 2.0},
        "image_knn": {"test": {"hr@10": 0.3, "ndcg@10": 0.15}}, "items": 5, "model": {"test": part},
        "model+text_knn": {"test": {"hr@10": 0.6, "ndcg@10": 0.3}}, "model_name": "cammsr",
        "popularity": {"test": {"hr@10": 0.2, "ndcg@10": 0.1}}, "text_knn": {"test": {"hr@10": 0.4, "ndcg@10": 0.2}},
        "users": 3,
    }
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics, sort_keys=True))
    rows = markdown_table("tiny", path).splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| cammsr", "| most-popular", "| text kNN (untrained)",
                                                  "| image kNN (untrained)", "| cammsr + text kNN"]
    assert rows[4] == "| cammsr + text kNN | 0.6000 | 0.3000 |"
    console = Console(width=200, record=True)
    console.print(metrics_table("tiny", path))
    text = console.export_text()
    assert "2.50x" in text  # NDCG@10 lift over most-popular
    header = next(line for line in text.splitlines() if "metric" in line)
    assert header.index("most-popular") < header.index("text kNN") < header.index("image kNN") \
        < header.index("cammsr + text kNN")
