"""experiments/double_descent.py end to end at --quick, and its image loaders on tiny fake files."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_files import write_idx

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "double_descent.py"
sys.path.insert(0, str(REPO / "experiments"))


def run(args: list[str], out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--quick", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_quick_all_parts(tmp_path):
    out = tmp_path / "run"
    proc = run(["--digits"], out)
    for name in ("results.json", "report.md", "log.txt", "fig1.png", "fig2.png", "widths_digits.png"):
        assert (out / name).is_file(), name
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["seed"] == 0 and "seed 0" in proc.stdout
    fig1, fig2, widths = (payload["results"][k] for k in ("fig1", "fig2", "widths"))
    # Fig. 1: errors are rates, the big teacher labels the student split far better than chance
    for name in ("teacher", "student_soft", "student_hard"):
        errors = np.array(fig1[name]["error"])
        assert errors.shape == (len(fig1["ms"]),) and np.all((errors >= 0) & (errors <= 1))
    assert fig1["labeling_teacher_error_on_student_split"] < 0.15
    assert fig1["teacher"]["error"][-1] < 0.15 < fig1["teacher"]["error"][0]  # one feature is near chance
    # Fig. 2: MAE of probabilities in [0, 1]; the teacher fits its 250 points once m is large
    for values in fig2["mae"].values():
        assert all(0 <= v <= 1 for v in values["mean"])
    assert fig2["teacher_train_error"][-1] == 0.0
    assert 0.2 < fig2["bayes_error"] < 0.3  # Phi(-sqrt(50) * 0.1) = 0.24
    assert all(0 <= e <= 1 for e in fig2["student"]["error"])
    # widths: CIFAR-10 / SVHN say plainly they were not run; digits ran every model
    assert set(widths["skipped"]) == {"cifar10", "svhn"} and "needs the data set's files" in widths["skipped"]["svhn"]
    digits = widths["digits"]
    assert set(digits["teacher"]) == {str(w) for w in digits["widths"]}
    assert {f"{k}_from_{digits['widths'][-1]}" for k in ("soft", "hard")} <= set(digits["students"])
    report = (out / "report.md").read_text()
    assert "reproduced?" in report and "not run" in report and "Fig. 1" in report
    assert all(isinstance(c["reproduced"], bool) for c in fig1["claims"] + fig2["claims"] + digits["claims"])


def test_help_and_bad_arguments(capsys):
    import double_descent as script

    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["fig1", "--mnist", "/nonexistent"])
    assert exit_info.value.code == 2 and "--mnist" in capsys.readouterr().err
    args = script.parse_args([])
    assert args.seed == 0 and args.parts == list(script.PARTS) and args.mnist is None
    assert args.out.parts[-2:] == ("results", "double_descent")


def test_fig1_reads_mnist_idx_files(tmp_path):
    """Fake MNIST files with enough 4s and 9s: the IDX path of Fig. 1 runs end to end."""
    rng = np.random.default_rng(0)
    data = tmp_path / "mnist"
    data.mkdir()
    n_train, n_test = 8300, 300
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.choice([4, 9, 1], n, p=[0.49, 0.49, 0.02])
        images = rng.integers(0, 60, (n, 28, 28))
        images[labels == 9, :14] += 150  # a learnable difference
        write_idx(data / f"{prefix}-images-idx3-ubyte", images)
        write_idx(data / f"{prefix}-labels-idx1-ubyte", labels)
    out = tmp_path / "run"
    run(["fig1", "--mnist", str(data), "--fig1-m-max", "300", "--fig1-trials", "1"], out)
    fig1 = json.loads((out / "results.json").read_text())["results"]["fig1"]
    assert fig1["n_teacher"] == 1991 and fig1["n_student"] == 5895 and fig1["dim"] == 784
    assert fig1["n_test"] == int(np.sum(np.isin(np.frombuffer((data / "t10k-labels-idx1-ubyte").read_bytes()[8:],
                                                                np.uint8), (4, 9))))
    assert fig1["teacher"]["error"][-1] < 0.05


def test_width_sweep_on_fake_cifar10_and_svhn(tmp_path):
    """The CIFAR-10 (ResNet-18, augmentation) and SVHN (CNN, grayscale) paths on tiny fake files."""
    import scipy.io

    rng = np.random.default_rng(1)
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 40))}
        with open(cifar / name, "wb") as fh:
            pickle.dump(batch, fh)
    svhn = tmp_path / "svhn"
    svhn.mkdir()
    for name, n in (("train", 60), ("test", 30)):
        scipy.io.savemat(svhn / f"{name}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                      "y": rng.integers(1, 11, (n, 1))})
    out = tmp_path / "run"
    run(["widths", "--cifar10", str(tmp_path), "--svhn", str(svhn), "--widths", "1,2", "--source-widths", "max",
         "--batch-size", "16"], out)
    widths = json.loads((out / "results.json").read_text())["results"]["widths"]
    assert widths["skipped"] == {}
    assert widths["cifar10"]["model"] == "resnet18" and widths["cifar10"]["augment"] is True
    assert widths["svhn"]["model"] == "cnn" and widths["svhn"]["sizes"]["teacher"] == round(0.12 * 60)
    assert widths["cifar10"]["sizes"] == {"teacher": 66, "student": 134, "test": 40}
    for name in ("cifar10", "svhn"):
        assert (out / f"widths_{name}.png").is_file()


def test_models_and_augmentation_shapes():
    import double_descent as dd

    for cls in (dd.CNN5, dd.ResNet18):
        for channels, size in ((1, 8), (3, 32)):
            model = cls(2, channels, 10, size)
            assert model(torch.zeros(4, channels, size, size)).shape == (4, 10)
    # widths m, 2m, 4m, 8m: the CNN's last conv has 8m filters
    assert dd.CNN5(3, 1, 10, 32).head.in_features == 24 * 2 * 2
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = dd.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # every output pixel comes from the image or the zero padding, rows stay rows
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


@pytest.mark.parametrize("m_max", [10_000, 1000])
def test_log_grid(m_max):
    import double_descent as dd

    grid = dd.log_grid(m_max)
    assert grid[0] == 1 and grid[-1] == m_max and grid == sorted(set(grid))
