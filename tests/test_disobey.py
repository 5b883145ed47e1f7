"""experiments/disobey.py (seed 001): the script end to end at --quick, and its helpers."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_files import write_idx
from scipy.special import logit, softmax

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "disobey.py"
sys.path.insert(0, str(REPO / "experiments"))

import disobey


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_help():
    out = run_script("--help").stdout
    for flag in ("--seed", "--quick", "--out", "--no-progress", "theorem", "trajectories", "confidence"):
        assert flag in out


def test_quick_all(tmp_path):
    out = tmp_path / "run"
    proc = run_script("--quick", "--no-progress", "--out", str(out))
    files = ["results.json", "report.md", "log.txt", "theorem_paths.png", "theorem_margins.png"]
    files += [f"{kind}_{s}.png" for kind in ("trajectories", "confidence") for s in disobey.SETTINGS]
    for name in files:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["parts_run"] == list(disobey.PARTS) and results["config"]["seed"] == 0
    assert results["config"]["quick"] is True

    # part 1: the theorem is a theorem; no check may fail, and they all run
    flow = results["parts"]["theorem"]["gradient_flow"]
    assert flow["checks"] >= 1000 and flow["violated"] == 0 and flow["holds"] + flow["ties"] == flow["checks"]
    assert flow["max_top_mismatch"] < 1e-8  # the solved teacher time really matches along the top direction
    for r in results["parts"]["theorem"]["gradient_descent"]["by_step_size"].values():
        assert r["checks"] > 100 and r["violated"] == 0 and r["holds"] > 0

    # part 2: every setting measured on pairs of directions, fractions in [0, 1]
    for setting in disobey.SETTINGS:
        s = results["parts"]["trajectories"][setting]["summary"]
        assert s["pairs"] >= 10
        for key in ("fraction_pairs_student_leans_more_top", "fraction_pairs_teacher_lean_positive",
                    "fraction_pairs_student_lean_greater", "fraction_pairs_control_leans_more_top"):
            assert 0.0 <= s[key] <= 1.0, (setting, key)
        assert abs(s["median_lean_teacher"]) <= 0.5

    # part 3: finite slopes, one per run; models that learned (digits: chance is 10%)
    for setting in disobey.SETTINGS:
        conf = results["parts"]["confidence"][setting]
        assert conf["runs"] == 1
        for split in ("train", "test"):
            assert len(conf[split]["slope_low"]) == 1
            assert math.isfinite(conf[split]["slope_low"][0]) and math.isfinite(conf[split]["slope_high"][0])
        acc = results["parts"]["accuracy"][setting]
        assert acc["teacher"][0]["test"] > 0.5 and acc["student"][0]["test"] > 0.3, (setting, acc)
    mislabeled = results["parts"]["confidence"]["random_features"]["mislabeled"]
    assert mislabeled["points_per_run"] == 300  # 25% of the 1,200 training digits

    verdicts = {c["verdict"] for c in results["claims"]}
    assert verdicts <= {"reproduced", "partly", "not reproduced"}
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "Part 1" in report and "Part 3" in report and "--quick" in report
    assert "wall time" in (out / "log.txt").read_text()
    assert "results in" in proc.stdout


def test_quick_single_part(tmp_path):
    out = tmp_path / "theorem"
    run_script("theorem", "--quick", "--no-progress", "--seed", "3", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["parts_run"] == ["theorem"] and set(results["parts"]) == {"theorem"}
    assert results["config"]["seed"] == 3
    assert not (out / "trajectories_mlp.png").exists()


# --------------------------------------------------------------------------- helpers


def test_label_noise_changes_exactly_the_fraction_to_other_classes():
    y = torch.arange(200) % 10
    noisy = disobey.add_label_noise(y, 0.25, 10, seed=0)
    changed = noisy != y
    assert int(changed.sum()) == 50
    assert noisy.min() >= 0 and noisy.max() < 10


def test_top_class_confidence_is_the_logit_of_the_probability():
    logits = torch.randn(50, 7, dtype=torch.float64)
    cls = torch.randint(0, 7, (50,))
    p = softmax(logits.numpy(), axis=1)[np.arange(50), cls.numpy()]
    np.testing.assert_allclose(disobey.top_class_confidence(logits, cls), logit(p), rtol=1e-10, atol=1e-10)
    # where p rounds to 1 the margin is still exact
    big = torch.tensor([[60.0, 0.0, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(disobey.top_class_confidence(big, torch.tensor([0])), [60.0 - math.log(2)])


def test_bottom_at_levels_and_lean():
    top = np.array([0.0, 1.0, 2.0, 1.5, 3.0])
    bottom = np.array([0.0, 0.5, 1.0, 2.0, 3.0])
    got = disobey.bottom_at_levels(top, bottom, np.array([0.0, 0.5, 1.5, 2.5, 4.0]))
    # 1.5 is first reached between steps 1 and 2 (not on the way back down); 2.5 between steps 3 and 4
    np.testing.assert_allclose(got[:4], [0.0, 0.25, 0.75, 2.0 + (2.5 - 1.5) / 1.5 * 1.0])
    assert np.isnan(got[4])
    t = np.linspace(0, 1, 101)
    assert abs(disobey.normalized_lean(t, t)) < 1e-12                          # straight: no lean
    assert disobey.normalized_lean(np.sqrt(t), t) > 0.1                        # top first: positive
    assert disobey.normalized_lean(t**2, t) < -0.1                             # bottom first: negative


def test_teacher_bracket():
    top = np.array([0.0, 0.5, 0.8, 0.9])
    bottom = np.array([0.0, 0.1, 0.3, 0.6])
    lo, hi = disobey.teacher_bracket(top, bottom, np.array([0.5, 0.6, 0.95]))
    np.testing.assert_allclose(lo[:2], [0.1, 0.1])
    np.testing.assert_allclose(hi[:2], [0.1, 0.3])
    assert np.isnan(lo[2]) and np.isnan(hi[2])


def test_mnist_and_cifar_loaders(tmp_path):
    rng = np.random.default_rng(0)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    images = rng.integers(0, 256, (30, 28, 28))
    write_idx(mnist / "train-images-idx3-ubyte.gz", images)
    write_idx(mnist / "train-labels-idx1-ubyte.gz", np.arange(30) % 10)
    write_idx(mnist / "t10k-images-idx3-ubyte", images[:12])
    write_idx(mnist / "t10k-labels-idx1-ubyte", np.arange(12) % 10)
    x_tr, y_tr, x_te, y_te, desc = disobey.load_mnist(mnist, seed=0, train_size=20, test_size=5)
    assert x_tr.shape == (20, 1, 28, 28) and x_te.shape == (5, 1, 28, 28) and "MNIST" in desc
    assert y_te.shape == (5,) and y_te.dtype == torch.int64
    first = int(np.nonzero((images == (x_tr[0, 0].numpy() * 255).round()).all(axis=(1, 2)))[0][0])
    assert y_tr[0] == first % 10  # images stay with their labels
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0

    cifar = tmp_path / "cifar"
    cifar.mkdir()
    for name, n in (("data_batch_1", 8), ("data_batch_2", 8), ("test_batch", 6)):
        with open(cifar / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}, f)
    x_tr, y_tr, x_te, _, desc = disobey.load_cifar10(cifar, seed=0, train_size=10, test_size=4)
    assert x_tr.shape == (10, 3, 32, 32) and x_te.shape == (4, 3, 32, 32) and len(y_tr) == 10
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        disobey.load_mnist(cifar, 0, 1, 1)
