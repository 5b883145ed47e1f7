"""The experiment scripts end to end at their CI scale (--scale tiny)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["amazon670k.py", "amazoncat13k.py"])
def test_xmc_script_tiny(script, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / script), "--scale", "tiny", "--no-progress",
         "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "scale 'tiny'" in proc.stdout
    for name in ("results.json", "report.md", "log.txt", "pk.png", "teacher.pt"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"teacher", "student", "student_kd", "student_dd"}
    for model, r in results["results"].items():
        for key in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5"):
            assert 0.0 <= r["metrics"][key] <= 1.0, (model, key)
        assert r["losses"] and not any(math.isnan(x) for x in r["losses"]), model  # trained, no NaN
    # the teacher learns: far above the most-popular-labels baseline of the tiny set (P@1 ~ 0.04)
    assert results["results"]["teacher"]["metrics"]["P@1"] > 0.2
    report = (out / "report.md").read_text()
    assert "| Teacher |" in report and "orderings" in report
    assert len(results["orderings"]) == 12


@pytest.mark.parametrize("signal", ["topk", "on-the-fly"])
def test_xmc_estimate_tiny(signal, tmp_path):
    """--estimate times real steps of every model and projects the run from them, training nothing."""
    out = tmp_path / "estimate"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "amazon670k.py"), "--scale", "tiny", "--no-progress",
         "--estimate", "--estimate-steps", "2", "--teacher-signal", signal, "--out", str(out),
         "--cache-dir", str(tmp_path / "cache"), *(["--matmul-precision", "high"] if signal == "on-the-fly" else [])],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "projected wall time" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"estimate.json", "log.txt"}  # no model, table or labels
    summary = json.loads((out / "estimate.json").read_text())
    assert summary["config"]["matmul_precision"] == ("high" if signal == "on-the-fly" else "highest")
    est = summary["estimate"]
    assert list(est["models"]) == ["teacher", "student", "student_kd", "student_dd"]
    # tiny: 2,000 points in batches of 256 (8 steps per epoch), 2 teacher and 3 student epochs
    for name, m in est["models"].items():
        assert m["steps"] == 8 * (2 if name == "teacher" else 3), name
        assert len(m["timed_step_seconds"]) == 2 and min(m["timed_step_seconds"]) > 0, name
        assert m["train_seconds"] == pytest.approx(m["seconds_per_step"] * m["steps"]), name
        assert m["eval_seconds"] > 0, name
    if signal == "topk":  # the training points are labeled first (timed on a batch)
        assert est["labeling_seconds"] > 0
    else:
        assert est["labeling_seconds"] == 0
    parts = est["data_seconds"] + est["train_seconds"] + est["eval_seconds"] + est["labeling_seconds"]
    assert est["total_seconds"] == pytest.approx(parts)
    assert est["train_seconds"] == pytest.approx(sum(m["train_seconds"] for m in est["models"].values()))
    assert est["peak_memory_bytes"] > 0


def test_kd_targets_tiny(tmp_path):
    """The distillation-target ablation at --scale tiny: its uniform-target check passes, every
    variant trains and is scored."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "kd_targets.py"), "--scale", "tiny", "--no-progress",
         "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gradients equal" in proc.stdout  # the soft term on 1/m targets is the hard loss
    for name in ("results.json", "report.md", "log.txt", "pk.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert list(results["results"]) == ["uniform_pos", "kd", "teacher_pos", "pos_uniform_neg_teacher", "mix"]
    for variant, r in results["results"].items():
        assert 0.0 <= r["metrics"]["P@1"] <= 1.0, variant
        assert r["losses"] and not any(math.isnan(x) for x in r["losses"]), variant
    # the hard-label target learns: far above the most-popular-labels baseline of the tiny set (P@1 ~ 0.04)
    assert results["results"]["uniform_pos"]["metrics"]["P@1"] > 0.15
    assert "| kd |" in (out / "report.md").read_text()


def test_teacher_init_depends_only_on_the_seed(tmp_path):
    """The teacher starts from the same weights whichever models the run trains (the run's time
    estimate builds and steps a model of each width first), so a teacher trained alone matches
    the one of a full run; the students' and the batch orders' seeds never collide across seeds."""
    import torch

    sys.path.insert(0, str(REPO / "experiments"))
    import xmc

    def teacher_weights(models: str, run: str) -> dict:
        out = tmp_path / run
        proc = subprocess.run(
            [sys.executable, str(REPO / "experiments" / "amazon670k.py"), "--scale", "tiny", "--no-progress",
             "--models", models, "--teacher-epochs", "0", "--student-epochs", "0",
             "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
            capture_output=True, text=True, timeout=600, check=False,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return torch.load(out / "teacher.pt", weights_only=False)["state_dict"]

    alone = teacher_weights("teacher", "alone")
    with_students = teacher_weights("teacher,student,student_kd", "with_students")
    assert alone.keys() == with_students.keys()
    for key in alone:
        assert torch.equal(alone[key], with_students[key]), key
    seeds = {xmc.model_seed(seed, name, stream) for seed in range(20) for name in xmc.MODELS for stream in (0, 1)}
    assert len(seeds) == 20 * len(xmc.MODELS) * 2
