"""pytest-benchmark cases of the fused linear benchmark, at a size that runs in seconds.

    pytest benchmarks/test_bench_fused_linear.py --benchmark-only
    pytest benchmarks/ --benchmark-only -k dd_topk --benchmark-compare

Forward+backward (gradients of the student hidden and weight) of
``kdfast.fused_linear_distillation_loss`` and of PyTorch eager for the five cases of
``bench_fused_linear.py`` (hard CE; CE + KD and double distillation with the teacher on
the fly; double distillation with a top-32 teacher; pick-all-labels), B=64, d_s=64,
d_t=512, V=100,000, float32, CPU. Timing only (no peak memory: ``bench_fused_linear.py``
measures that in fresh processes). In ``make test`` (CI) they run with ``--benchmark-disable``:
each step once, untimed, for its checks.

The tests after those check the ``--device cuda`` path without a GPU (arguments, plan, helpers
on CPU tensors, a run with fake workers, the report, ``cuda_smoke.py``); they take seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fused_linear
import common
import cuda_smoke

BATCH = 64
CLASSES = 100_000
DIM = 64
TEACHER_DIM = 512


@pytest.fixture(scope="module", params=bench_fused_linear.CASES)
def case_inputs(request):
    case = request.param
    return case, bench_fused_linear.make_inputs(case, BATCH, CLASSES, DIM, TEACHER_DIM)


@pytest.mark.parametrize("impl", bench_fused_linear.IMPLS)
def test_forward_backward(benchmark, case_inputs, impl):
    case, x = case_inputs
    if impl == "kdfast":
        pytest.importorskip("kdfast", reason="the kdfast extension is not built")
    step, reset = bench_fused_linear.make_step(impl, case, x)
    benchmark.group = f"{case} B={BATCH} d={DIM} V={CLASSES}"
    benchmark.extra_info.update(
        case=case, impl=impl, batch=BATCH, classes=CLASSES, d=DIM,
        d_t=TEACHER_DIM if case in bench_fused_linear.ON_THE_FLY else None,
        dtype="float32", threads=torch.get_num_threads(),
    )
    loss = benchmark.pedantic(step, setup=reset, rounds=10, iterations=1, warmup_rounds=2)
    assert torch.isfinite(loss)
    assert x.h.grad is not None and x.h.grad.shape == x.h.shape
    assert x.W.grad is not None and x.W.grad.shape == x.W.shape


# ---------------------------------------------------------------------------------------------
# The --device cuda path, checked without a GPU: arguments, the plan, the helpers on CPU tensors
# (kdfast's CPU kernels stand in for the CUDA ones), the run with fake workers, the report, and
# cuda_smoke.py. Each takes well under a second or two.
# ---------------------------------------------------------------------------------------------

b = bench_fused_linear


def _kdfast_importable() -> bool:
    return common.package_version("kdfast") != "unavailable"


def test_cpu_defaults_unchanged():
    args = b.parse_args([])
    assert (args.device, args.batch, args.repeats, args.warmup, args.dtype) == ("cpu", 256, 3, 1, "float32")
    assert args.case_list == list(b.CASES) and args.impl_list == list(b.IMPLS)
    assert b.worker_argv("ce", "eager", args)[2:4] == ["ce", "eager"]


def test_cuda_defaults():
    args = b.parse_args(["--device", "cuda"])
    assert (args.batch, args.repeats, args.warmup, args.dtype) == (4096, 20, 3, "bfloat16")
    assert args.case_list == list(b.CUDA_CASES) and args.impl_list == list(b.CUDA_IMPLS)
    args = b.parse_args(["--device", "cuda", "--cases", "topk,ce", "--impls", "liger,kdfast", "--batch", "8"])
    assert args.case_list == ["ce", "topk"] and args.impl_list == ["kdfast", "liger"] and args.batch == 8


@pytest.mark.parametrize("argv", [["--dtype", "bfloat16"], ["--json", "x.json"], ["--cases", "topk"],
                                  ["--impls", "liger"], ["--device", "cuda", "--impls", "nope"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        b.parse_args(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_unavailable_is_a_clear_error(capsys):
    assert b.main(["--device", "cuda", "--no-write"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cuda_plan_runs_each_implementation_on_its_losses():
    plan = b.cuda_plan(list(b.CUDA_CASES), list(b.CUDA_IMPLS))
    assert {c for c, i in plan if i == "liger"} == {"ce", "ce_kd_linear", "pal"}
    assert {c for c, i in plan if i == "cce"} == {"ce", "pal"}
    assert {c for c, i in plan if i == "kdfast"} == set(b.CUDA_CASES)
    assert plan[0] == ("ce", "kdfast") and plan[-1][1] == "compile"  # kdfast first, the slow compiles last


@pytest.mark.parametrize("case", b.CUDA_CASES)
@pytest.mark.parametrize("impl", ["kdfast", "eager"])
def test_cuda_helpers_on_cpu_tensors(case, impl):
    if impl == "kdfast" and not _kdfast_importable():
        pytest.skip("the kdfast extension is not built")
    x = b.make_inputs_cuda(case, 12, 1500, 8, 24, torch.bfloat16, dense_topk=impl == "eager", device="cpu")
    step, reset = b.make_cuda_step(impl, case, x)
    reset()
    assert torch.isfinite(step())
    check = b.cuda_check(case, impl, x, 8, "bfloat16")
    assert check["ok"], b.cuda_check_line(case, impl, check)
    inputs, grads = b.state_bytes(case, 12, 1500, 8, 24, 2, x.num_positives)
    assert grads == (0 if case == "topk" else (12 + 1500) * 8 * 2) and inputs > 0


def test_tf32_dtype_checks_against_exact_float32():
    """--dtype tf32: float32 inputs, the tf32 tolerances, and the reference computed with tf32 off
    (the flag put back after)."""
    assert b.DTYPES["tf32"] is torch.float32
    assert [b.check_tol_kind(n) for n in ("bfloat16", "float16", "float32", "tf32")] == ["low", "low", "float32", "tf32"]
    assert b.CHECK_TOL["float32"] < b.CHECK_TOL["tf32"] < b.CHECK_TOL["low"]
    x = b.make_inputs_cuda("ce", 12, 1500, 8, 24, torch.float32, device="cpu")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check = b.cuda_check("ce", "eager", x, 8, "tf32")
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert check["ok"] and check["loss_rel"] <= b.CHECK_TOL["tf32"][0]


@pytest.mark.parametrize("impl,module", [("liger", "liger_kernel"), ("cce", "cut_cross_entropy")])
def test_missing_peer_is_not_installed(impl, module):
    import importlib.util

    x = b.make_inputs_cuda("ce", 4, 300, 8, 16, torch.float32, device="cpu")
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    assert b.peer_version(impl) is None
    with pytest.raises(b.PeerUnavailable, match="not installed"):
        b.make_cuda_step(impl, "ce", x)


def _fake_result(case, impl, t, status="ok"):
    if status != "ok":
        return {"case": case, "impl": impl, "status": status, "message": f"{status} (fake)"}
    check = ({"rows": 8, "lse": 0.0, "entropy": 0.0, "covered": 0.0, "topk_logits": 0.0, "ok": True} if case == "topk"
             else {"rows": 8, "loss": 1.0, "loss_ref": 1.0, "loss_rel": 0.0, "grad_h_rel": 0.0, "grad_W_rel": 0.0,
                   "ok": True})
    return {"case": case, "impl": impl, "status": "ok", "message": "", "positives": 0, "first_step_s": 1.0,
            "peak_mb": 10.0, "loss": 1.0, "times": [t] * 3, "time_s": t, "steps": 3, "check": check}


@pytest.fixture
def fake_cuda_run(monkeypatch, tmp_path):
    """main --device cuda with fake workers, a fake clock and the CSV / BENCHMARKS.md under tmp_path."""
    clock = {"now": 0.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(b, "peer_version", lambda impl: "0.8.5" if impl == "liger" else None)
    monkeypatch.setattr(b, "_clock", lambda: clock["now"])
    monkeypatch.setattr(b, "CSV_PATH_CUDA", tmp_path / "fused_linear_cuda.csv")
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# B\n\n<!-- bench_fused_linear_cuda:begin -->\nNot run yet.\n<!-- bench_fused_linear_cuda:end -->\n")
    monkeypatch.setattr(common, "BENCHMARKS_MD", md)
    times = {"kdfast": 0.002, "eager": 0.010, "liger": 0.2, "compile": 0.004}

    def fake(argv, timeout=None, env=None):
        clock["now"] += 10.0
        if "--_gemm" in argv:
            return {"tflops": 800.0, "runs_tflops": [800.0], "device": "Fake GPU", "sm_count": 1, "memory_gib": 80,
                    "capability": "9.0", "cuda": "13.0"}, ""
        i = argv.index("--_cuda_worker")
        case, impl = argv[i + 1], argv[i + 2]
        if (case, impl) == ("pal", "eager"):
            return _fake_result(case, impl, 0, "oom"), ""
        if (case, impl) == ("pal", "compile"):
            return None, "exit status -11"
        return _fake_result(case, impl, times[impl] * (1.25 if case == "dd_linear" else 1)), ""

    monkeypatch.setattr(common, "try_run_worker", fake)
    return tmp_path, clock


def test_cuda_run_with_fake_workers(fake_cuda_run):
    tmp_path, _ = fake_cuda_run
    assert b.main(["--device", "cuda", "--json", str(tmp_path / "run.json")]) == 0
    payload = json.loads((tmp_path / "run.json").read_text())
    status = {(r["case"], r["impl"]): r["status"] for r in payload["results"]}
    assert status[("ce", "cce")] == "not installed" and status[("pal", "eager")] == "oom"
    assert status[("pal", "compile")] == "error" and status[("ce", "kdfast")] == "ok"
    assert payload["meta"]["device"] == "Fake GPU"
    md = common.BENCHMARKS_MD.read_text()
    assert "Not run yet" not in md and "| hard CE | kdfast | ok | 2.00 |" in md
    assert "hard CE: speed PASS (2.00x the fastest peer (torch.compile(eager)) >= 1.5x)" in md
    assert "double distillation vs KD (both teacher on the fly): PASS (double distillation 1.25x" in md
    assert "throughput PASS (2,048,000 rows/s >= 300,000)" in md
    rows = b.CSV_PATH_CUDA.read_text().splitlines()
    assert rows[0] == ",".join(b.CUDA_CSV_COLUMNS) and len(rows) == 1 + len(payload["results"])


def test_cuda_run_keeps_to_its_time_budget(fake_cuda_run):
    tmp_path, _ = fake_cuda_run
    # every fake worker takes 10 s of the fake clock: with 100 s, the later pairs are skipped and reported
    assert b.main(["--device", "cuda", "--time-budget", "100", "--no-write", "--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert results[0]["status"] == "ok" and results[-1]["status"] == "skipped"
    assert len(results) == len(b.cuda_plan(list(b.CUDA_CASES), list(b.CUDA_IMPLS)))


def test_merge_json(tmp_path, capsys):
    args = {"batch": 4096, "classes": 670091, "dim": 64, "teacher_dim": 512, "dtype": "bfloat16", "repeats": 20,
            "warmup": 3, "impl_seconds": 20.0, "check_rows": 256}
    meta = {"date": "d", "commit": "c", "device": "Fake GPU", "torch": "t", "kdfast": "k", "python": "p", "cuda": "13"}
    gemm = {"start": {"tflops": 800.0}}
    first = {"meta": meta, "args": args, "peers": {"liger": None}, "gemm": gemm,
             "results": [_fake_result("ce", "kdfast", 0.002), _fake_result("ce", "compile", 0, "skipped")]}
    second = {"meta": meta, "args": args, "peers": {"liger": "0.8.5"}, "gemm": gemm,
              "results": [_fake_result("ce", "compile", 0.004), _fake_result("ce", "kdfast", 0, "skipped")]}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, payload in zip(paths, (first, second)):
        path.write_text(json.dumps(payload))
    merged = b.merge_payloads([str(p) for p in paths])
    assert [(r["impl"], r["status"]) for r in merged["results"]] == [("kdfast", "ok"), ("compile", "ok")]
    assert merged["peers"]["liger"] == "0.8.5"
    assert b.main(["--device", "cuda", "--merge-json", *map(str, paths), "--no-write"]) == 0
    assert "2.00x the fastest peer" in capsys.readouterr().out
    paths[1].write_text(json.dumps({**second, "args": {**args, "batch": 1}}))
    with pytest.raises(ValueError, match="differ"):
        b.merge_payloads([str(p) for p in paths])


def test_memory_goal_counts_weights_and_gradients():
    inputs, grads = b.state_bytes("ce", 4096, 670091, 64, 512, 2)
    assert grads == (4096 + 670091) * 64 * 2 and inputs == grads + 4096 * 8
    payload = {"args": {"batch": 4096, "classes": 670091, "dim": 64, "teacher_dim": 512, "dtype": "bfloat16"},
               "gemm": {"start": {"tflops": 800.0}},
               "results": [{**_fake_result("ce", "kdfast", 0.002), "peak_mb": grads / common.MB * 1.05}]}
    summary = b.summarize_cuda(payload)
    r = payload["results"][0]
    assert r["mem_ratio"] == pytest.approx((inputs + 1.05 * grads) / (inputs + grads))
    assert {g[0]: g[1] for g in summary["cases"][0]["goals"]}["memory"] is True
    assert r["floor_s"] == pytest.approx(6 * 4096 * 64 * 670091 / 800e12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_smoke_without_cuda(capsys):
    assert cuda_smoke.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_cuda_smoke_self_check_on_cpu():
    if not _kdfast_importable():
        pytest.skip("the kdfast extension is not built")
    assert cuda_smoke.main(["--device", "cpu", "--quick", "--only", "topk"]) == 0


def test_cuda_smoke_compare_catches_a_difference(capsys):
    checks = cuda_smoke.Checks()
    a = torch.randn(50, dtype=torch.float64)
    cuda_smoke.compare(checks, "same", {"x": (a, a.clone())}, 1e-10)
    cuda_smoke.compare(checks, "off", {"x": (a, a * 1.01)}, 1e-3)
    cuda_smoke.compare(checks, "nan", {"x": (a, a.clone().fill_(float("nan")))}, 1.0)
    cuda_smoke.compare(checks, "missing grad", {"x": (a, None)}, 1.0)
    assert checks.total == 4 and checks.failed == ["off", "nan", "missing grad"]
