"""Checks of ``profile_fused.py`` without a GPU: the kernel grouping on CUDA-style names, the
summary arithmetic, and a whole CPU run at a tiny shape (seconds).

    pytest benchmarks/test_profile_fused.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fused_linear
import profile_fused


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        (("void kdfast::cuda::(anonymous namespace)::accumulate_tile_kernel<float>(kdfast::cuda::LossTerms, "
          "kdfast::cuda::Targets, float const*, float const*, float const*, long, long, float*)"), "kdfast"),
        ("kdfast::fused_linear_loss_forward", "kdfast"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off",
         "gemm"),
        ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8>(...)", "gemm"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", "gemm"),
        ("ampere_sgemm_128x64_tn", "gemm"),
        ("aten::mm", "gemm"),
        ("aten::addmm_", "gemm"),
        ("Memcpy DtoD (Device -> Device)", "other"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, ...>", "other"),
        ("aten::mm_backward_helper", "other"),
    ],
)
def test_kernel_kind(name, kind):
    assert profile_fused.kernel_kind(name) == kind


def test_summarize_sums_counts_and_orders():
    rows = [("aten::mm", 300.0), ("kdfast::fused_linear_loss_forward", 100.0), ("aten::mm", 200.0),
            ("aten::copy_", 50.0), ("aten::empty", 0.0), ("aten::zeros", -1.0)]
    out = profile_fused.summarize(rows, wall_s=0.002)
    assert out["wall_s"] == 0.002
    assert out["by_kind_s"] == pytest.approx({"gemm": 500e-6, "kdfast": 100e-6, "other": 50e-6})
    assert out["profiled_s"] == pytest.approx(650e-6)
    assert out["calls"] == {"gemm": 2, "kdfast": 1, "other": 1}  # rows of no time are left out
    assert [r["name"] for r in out["top"]] == ["aten::mm", "kdfast::fused_linear_loss_forward", "aten::copy_"]
    assert out["top"][0]["s"] == pytest.approx(500e-6)


def test_summarize_keeps_the_largest_kernels_only():
    rows = [(f"k{i}", float(i + 1)) for i in range(profile_fused.TOP_KERNELS + 5)]
    out = profile_fused.summarize(rows, wall_s=1.0)
    assert len(out["top"]) == profile_fused.TOP_KERNELS
    assert out["top"][0]["name"] == f"k{profile_fused.TOP_KERNELS + 4}"


def test_cpu_run_writes_every_phase(tmp_path, capsys):
    path = tmp_path / "profile.json"
    rc = profile_fused.main(["--device", "cpu", "--batch", "8", "--classes", "3001", "--dim", "16",
                             "--teacher-dim", "24", "--cases", "ce,dd_linear,topk", "--warmup", "1",
                             "--json", str(path)])
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["args"]["dtype"] == "float32" and report["args"]["batch"] == 8
    cases = {c["case"]: c for c in report["cases"]}
    assert list(cases) == ["ce", "dd_linear", "topk"]
    assert set(cases["ce"]) >= {"forward", "backward"}
    assert "backward" not in cases["topk"]  # labeling has no gradient
    for case in cases.values():
        for phase in ("forward", "backward"):
            if phase not in case:
                continue
            p = case[phase]
            assert p["wall_s"] > 0
            assert sum(p["by_kind_s"].values()) == pytest.approx(p["profiled_s"])
            # the tile loop's GEMMs run through aten::mm on the CPU, and kdfast's op is there
            assert p["by_kind_s"]["gemm"] > 0 and p["calls"]["gemm"] >= 1
            assert p["by_kind_s"]["kdfast"] > 0
    # the profiled loss is the benchmark's loss on the same inputs
    x = bench_fused_linear.make_inputs_cuda("dd_linear", 8, 3001, 16, 24, torch.float32, device="cpu")
    expected = float(bench_fused_linear.kdfast_loss("dd_linear", x).detach())
    assert math.isclose(cases["dd_linear"]["loss"], expected, rel_tol=1e-6)
    printed = capsys.readouterr().out
    assert "dd_linear: double distillation, teacher on the fly" in printed
    assert "  backward wall" in printed


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch", "0"], "--batch must be at least 1"),
    (["--teacher-dim", "-3"], "--teacher-dim must be at least 1"),
    (["--warmup", "-1"], "--warmup must be at least 0"),
    (["--cases", "ce,nope"], "unknown ['nope']"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_fused.parse_args(["--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is visible")
def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        profile_fused.parse_args(["--device", "cuda"])
    assert "no CUDA device is visible" in capsys.readouterr().err
