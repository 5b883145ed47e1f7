"""experiments/wide_networks.py (seed 004, Figs. 1–5) end to end at --quick."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "wide_networks.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          check=False)


def test_wide_networks_quick_all(tmp_path):
    out = tmp_path / "run"
    proc = _run("--quick", "--no-progress", "--seed", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = ["fig1_effective_logits.png", "fig2_transfer_risk.png", "fig3_data_inefficiency.png",
             "fig4_teacher_epoch_and_soft_ratio.png", "fig5_imperfect_teacher.png"]
    for name in [*names, "results.json", "report.md", "log.txt"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 3 and results["config"]["quick"] is True
    figs = results["figures"]
    assert set(figs) == {"fig1", "fig2", "fig3", "fig4", "fig5"}
    for fig in figs.values():
        assert fig["claims"] and all(c["reproduced"] in ("yes", "no") for c in fig["claims"])

    # fig 1: the split at z_t = 0 is 0 for pure soft labels and grows as ρ falls
    splits = [v for _, v in sorted(figs["fig1"]["splits_by_rho_T5"].items(), key=lambda kv: float(kv[0]))]
    assert splits[-1] < 1e-9 and all(a > b > 0 for a, b in itertools.pairwise(splits[:-1]))
    # fig 2: risks are fractions, fall with n, and Theorem 1's bound holds
    risk = figs["fig2"]["mean_risk"]
    assert all(0 <= r <= 1 for row in risk for r in row)
    assert all(row[-1] < row[0] for row in risk)
    assert figs["fig2"]["bound_violations"] == 0
    # figs 3-4: finite I(n); random labels far above the zero function
    for key in ("fig3", "fig4"):
        assert all(math.isfinite(v) for row in figs[key]["binned_I"] for v in row)
    w3 = figs["fig3"]["windows"]
    late = next(k for k in w3["random labels"] if k.startswith("n in [100"))
    assert w3["random labels"][late] > 0.5
    assert w3["zero function"][late] < 0.15
    # fig 5: accuracies are fractions; the teacher's accuracy grows with its epochs
    assert all(0 <= a <= 1 for row in figs["fig5"]["mean_accuracy"] for a in row)
    acc = list(results["teacher"]["test_accuracy"].values())
    assert acc[-1] > acc[0] + 0.1
    report = (out / "report.md").read_text()
    assert "| claim | paper | ours | reproduced |" in report and "seed 3" in report
    assert "Fig. 5" in report and "commit" in report


def test_wide_networks_one_figure(tmp_path):
    out = tmp_path / "fig1"
    proc = _run("fig1", "--quick", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["figures"]) == ["fig1"] and results["teacher"] is None
    assert (out / "fig1_effective_logits.png").is_file() and not (out / "fig2_transfer_risk.png").exists()


def test_wide_networks_help_and_bad_arguments(capsys):
    spec = importlib.util.spec_from_file_location("wide_networks_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
    for argv, message in ((["fig9"], "invalid choice"), (["fig1", "--temperature", "0"], "--temperature"),
                          (["--depth", "0"], "--depth"), (["--teacher-epoch", "999999"], "--teacher-epoch")):
        with pytest.raises(SystemExit) as exit_info:
            module.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    args = module.parse_args(["fig3", "--quick"])
    assert args.figure == "fig3" and args.seed == 0 and args.teacher_epoch == 300
