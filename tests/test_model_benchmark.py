"""The model benchmarks run end to end and report ratios from their own measurements: benchmarks/models.py to
BN-ReLU, benchmarks/detection_step.py to its first config variant; benchmarks/host_overhead.py times the CUDA code
path's host work on CPU; benchmarks/gpu_check.sh packs its logs for the device machine."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import models
from tests.test_channels_last import weights_channels_last


def test_model_benchmark_quick(tmp_path, capfd):
    out = tmp_path / "models.json"
    results = models.main(["--quick", "--layers", "bn_relu,s0", "--json", str(out), "--host-profile"])
    saved = json.loads(out.read_text())
    assert [(r["layer"], r["impl"]) for r in saved["results"]] == [("bn_relu", "torch"), ("s0", "fast"),
                                                                    ("s0", "reference")]
    assert results[0]["step_ratio"] == 1.0
    for r in saved["results"]:
        assert r["step_ms"] > 0 and r["saved_bytes"] > 0
        assert r["step_ratio"] == r["step_ms"] / saved["results"][0]["step_ms"]
        assert r["host_ms"] is None and r["device_ms"] is None  # the host/device split is measured on CUDA only
        assert r["compile_s"] is None
    assert saved["meta"]["arch"] == "preact_resnet_cifar"
    profiles = capfd.readouterr().err.split("--- host profile of one step, ")[1:]  # printed by each child
    assert [p.split("\n")[0] for p in profiles] == ["bn_relu/torch", "s0/fast", "s0/reference"]
    assert all("aten::convolution" in p and "Self CPU" in p for p in profiles)


def test_model_benchmark_compiled(tmp_path):
    """--compile: the model runs compiled, and the warm-up step, which compiles it, is reported apart (on CPU a
    compile takes seconds, an eager warm-up step of this tiny model well under one)."""
    out = tmp_path / "models.json"
    models.main(["--quick", "--layers", "bn_relu", "--compile", "--json", str(out)])
    saved = json.loads(out.read_text())
    (row,) = saved["results"]
    assert saved["meta"]["compile"] and 0 < 5 * row["step_ms"] < 1e3 * row["compile_s"]


def test_compiled_saved_bytes_are_the_compiled_models_in_its_precision(monkeypatch):
    """They were taken before compiling, outside autocast: the eager fp32 model's."""
    seen = []
    monkeypatch.setattr(models, "saved_bytes", lambda model, x: seen.append(
        (model._compiled_call_impl is not None, torch.get_autocast_dtype("cpu"), torch.is_autocast_enabled("cpu")))
        or 1)
    row = models.measure("preact_resnet_cifar", "bn_relu", "torch", batch=4, size=32, steps=1, device="cpu",
                         autocast="bfloat16", compile=True)
    assert seen == [(True, torch.bfloat16, True)] and row["saved_bytes"] == 1 and row["peak_bytes"] >= 0


def test_model_benchmark_runs_each_case_in_each_memory_format(tmp_path, monkeypatch):
    out = tmp_path / "models.json"
    models.main(["--quick", "--arch", "mobilenet_v2", "--layers", "bn_relu,s0", "--impls", "fast", "--in-chans", "1",
                 "--memory-formats", "contiguous,channels_last", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["layer"], r["memory_format"]) for r in saved["results"]] == [
        ("bn_relu", "contiguous"), ("bn_relu", "channels_last"), ("s0", "contiguous"), ("s0", "channels_last")]
    assert all(r["step_ratio"] == r["step_ms"] / saved["results"][0]["step_ms"] for r in saved["results"])
    seen = []  # what the channels-last child times: its weights and input in that format
    monkeypatch.setattr(models, "saved_bytes", lambda model, x: seen.append(
        (x.shape[1], x.is_contiguous(memory_format=torch.channels_last),
         weights_channels_last(model.parameters()))) or 1)
    models.measure("mobilenet_v2", "s0", "fast", batch=2, size=32, steps=1, device="cpu",
                   memory_format="channels_last", in_chans=1)
    assert seen == [(1, True, True)]


def test_detection_step_benchmark_times_each_variant(tmp_path, capsys):
    from benchmarks import detection_step
    from tests.test_maskrcnn import TINY_OVERRIDES

    common = [o for o in TINY_OVERRIDES if o.startswith("task.model.")] + [
        "norm=gn_relu", "task.data.batch_size=2", f"task.data.cache_dir={tmp_path}",
        "task.data.generate.image_size=64", "task.data.generate.num_train=6", "task.data.generate.num_val=2"]
    variants = ["task.model.roi_sampling_ratio=2", "task.model.roi_sampling_ratio=1 task.model.fpn_channels=8"]
    medians = detection_step.main([*common, "--steps", "2", *(a for v in variants for a in ("--variant", v))])
    assert list(medians) == variants and all(m > 0 for m in medians.values())
    rows = {line[:60].strip(): line.split()[-2:] for line in capsys.readouterr().out.splitlines()
            if line.startswith(tuple(variants))}
    assert rows[variants[0]][1] == "1.00"
    assert float(rows[variants[1]][0]) == pytest.approx(medians[variants[1]], abs=1e-3)
    with pytest.raises(SystemExit):  # the variants share the first one's batches: a data key would not reach them
        detection_step.main([*common, "--variant", "task.data.batch_size=4"])
    assert "give task.data.batch_size=4 to all, not one" in capsys.readouterr().err
    for layout, channels_last in (("channels_last=true", True), ("channels_last=null", False)):  # auto: no depthwise
        model, _ = detection_step.build_model([*common, layout], None)
        assert weights_channels_last(model.parameters()) == channels_last


def test_host_overhead_benchmark_times_every_launch_path():
    """Over the stand-in CUDA driver (its own process): each layer by default, with native launches, through
    kernel[grid] and in tiles, beside BN-ReLU and the empty function; it stops where a path fails."""
    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "benchmarks/host_overhead.py", "--layers", "b0,s2", "--calls", "20",
                           "--rounds", "1"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = {line[:28].strip(): line[28:].split() for line in done.stdout.splitlines()[1:]}
    assert list(rows) == ["bn_relu", "empty function", *(f"{name}{way}" for name in ("b0", "s2") for way in (
        "", " native", " via kernel[grid]", " in tiles (4 launches)"))]
    assert all(float(us) > 0 for us, _ in rows.values())


def test_gpu_check_packs_each_step_log_into_out(tmp_path):
    """With $OUT set, every step's log, a failed one's too (no GPU here), ends up in one archive in $OUT."""
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), "env"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.tar.gz"]  # no half-written pack left
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as pack:
        assert pack.getnames() == ["gpu_check", "gpu_check/env.log"]
        log = pack.extractfile("gpu_check/env.log").read().decode()
    assert log.startswith("== env: python -c") and log.rstrip().endswith(f"== env: exit {done.returncode}")
