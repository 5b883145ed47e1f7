"""experiments/statistical_perspective.py end to end at --quick, and its real-data parts on tiny fake files."""

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
SCRIPT = REPO / "experiments" / "statistical_perspective.py"
sys.path.insert(0, str(REPO / "experiments"))


def run(args: list[str], out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--quick", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_quick_all_parts(tmp_path):
    out = tmp_path / "run"
    proc = run([], out)
    for name in ("results.json", "report.md", "log.txt", "fig2.png", "fig3_fig4a.png", "appendix_b1.png",
                 "appendix_b2.png"):
        assert (out / name).is_file(), name
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["seed"] == 0 and "seed 0" in proc.stdout
    res = payload["results"]
    # Fig. 2: AUCs are AUCs; at the paper's r the problem is nearly separable (Bayes AUC ~ 1)
    by_n = res["fig2"]["by_n"]
    assert by_n["6.3246"]["bayes_auc"] > 0.999 and by_n["1.0"]["bayes_auc"] < 0.9
    rows = [v for sub in by_n.values() for k, v in sub.items() if k != "bayes_auc"]
    for v in rows + list(res["fig2"]["by_r"].values()):
        assert 0.5 <= v["onehot"][0] <= 1 and 0.5 <= v["bayes"][0] <= 1
    # the means closest together are the hardest problem
    by_r = res["fig2"]["by_r"]
    rs = sorted(by_r, key=float)
    assert by_r[rs[0]]["bayes"][0] < by_r[rs[-1]]["bayes"][0]
    # Fig. 3: MSEs of probabilities, AUCs above chance
    for sub in res["fig3"]["by_n"].values():
        for d in res["fig3"]["depths"]:
            assert 0 <= sub["teacher_mse"][str(d)][0] <= 1
            assert 0.5 < sub["student_auc"][str(d)][0] <= 1
    # B.1: the unbiased noiseless teacher is p* itself (MSE 0); MSE grows with the bias alpha
    for sub in res["b1"]["by_r"].values():
        grid = {(g["alpha"], g["sigma"]): g for g in sub["grid"]}
        assert grid[(0.0, 0.0)]["mse"] < 1e-12
        alphas = sorted({a for a, _ in grid})
        assert grid[(alphas[-1], 0.0)]["mse"] > grid[(alphas[1], 0.0)]["mse"] > 0
    # B.2: the distortion keeps the teacher's accuracy
    for sub in res["b2"]["by_r"].values():
        assert len({row["teacher_accuracy"] for row in sub["rows"]}) == 1
    # the real-data parts say plainly they did not run
    for part in ("fashion", "cifar100"):
        assert "not run" in res[part]["skipped"]
    report = (out / "report.md").read_text()
    assert "reproduced?" in report and "not run" in report and "100" in report
    for part in ("fig2", "fig3", "b1", "b2"):
        assert res[part]["claims"] and all(isinstance(c["reproduced"], bool) for c in res[part]["claims"])


def test_help_and_bad_arguments(capsys):
    import statistical_perspective as script

    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["b2", "--b2-alphas", "0.5"])
    assert exit_info.value.code == 2 and "--b2-alphas" in capsys.readouterr().err
    args = script.parse_args([])
    assert args.seed == 0 and args.parts == list(script.PARTS) and args.fashion_mnist is None
    assert args.out.parts[-2:] == ("results", "statistical_perspective")


def test_real_data_parts_on_fake_files(tmp_path):
    """Fashion-MNIST (IDX) and CIFAR-100 (python pickles) paths on tiny random files."""
    rng = np.random.default_rng(0)
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    for prefix, n in (("train", 200), ("t10k", 100)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, label in enumerate(labels):  # each class lights its own rows: learnable
            images[i, 2 * label: 2 * label + 2] += 200
        write_idx(fashion / f"{prefix}-images-idx3-ubyte", images)
        write_idx(fashion / f"{prefix}-labels-idx1-ubyte", labels)
    cifar = tmp_path / "cifar-100-python"
    cifar.mkdir()
    for name, n in (("train", 64), ("test", 32)):
        with open(cifar / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": list(rng.integers(0, 100, n))}, fh)
    out = tmp_path / "run"
    for part, epochs in (("fashion", "15"), ("cifar100", "1")):
        run([part, "--fashion-mnist", str(fashion), "--cifar100", str(tmp_path), "--batch-size", "32",
             "--epochs", epochs], out)
        res = json.loads((out / "results.json").read_text())["results"][part]
        assert "skipped" not in res and res["claims"]
        if part == "fashion":
            assert res["teacher_accuracy"] > 0.5  # the fake labels are learnable
            assert (out / "fig4b_fashion.png").is_file()
            zero = next(g for g in res["grid"] if g["alpha"] == 0 and g["sigma"] == 0)
            assert zero["mse"] < 1e-12  # the undistorted teacher is p* itself
        else:
            assert [r["depth"] for r in res["rows"]] == [8, 14]
            assert all(0 <= r["teacher_ece"] <= 1 and 0 <= r["student_accuracy"] <= 1 for r in res["rows"])
            assert (out / "fig1_cifar100.png").is_file()


def test_cifar_resnet_depths():
    import statistical_perspective as sp

    model = sp.CifarResNet(14)
    assert len(model.blocks) == 6  # depth 6n + 2 with n = 2: three stages of two blocks
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
