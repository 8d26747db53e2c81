"""benchmarks/models.py runs end to end and reports ratios to BN-ReLU from its own measurements."""
import json

from benchmarks import models


def test_model_benchmark_quick(tmp_path):
    out = tmp_path / "models.json"
    results = models.main(["--quick", "--layers", "bn_relu,s0", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["layer"], r["impl"]) for r in saved["results"]] == [("bn_relu", "torch"), ("s0", "fast"),
                                                                    ("s0", "reference")]
    assert results[0]["step_ratio"] == 1.0
    for r in saved["results"]:
        assert r["step_ms"] > 0 and r["saved_bytes"] > 0
        assert r["step_ratio"] == r["step_ms"] / saved["results"][0]["step_ms"]
    assert saved["meta"]["arch"] == "preact_resnet_cifar"
