"""``lrpkit evaluate`` sharded over processes (torch.distributed, gloo on CPU).

1. A real ``torchrun`` with 2 processes resumes a run that one process started and gives the same table as one
   process doing all of it; each rank computed its shard, nothing was recomputed, rank 0 merged the rows.
2. A failure on one rank stops every rank with an error (no rank waits forever), and the saved rows resume.
   Two forked processes (imports inherited, so this takes seconds, not the ~15 s of a fresh interpreter).
"""

import csv
import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from lrpkit.app import method_registry
from lrpkit.evaluate.runner import run_evaluation

METHODS = ["gradient", "rollout"]
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def keys(path):
    return [(r["image"], r["method"]) for r in map(json.loads, path.read_text().splitlines())]


def test_torchrun_two_processes_resume_and_match_one_process(tmp_path):
    reference = run_evaluation(tmp_path / "one", n=5, methods=METHODS, batch_size=2, device="cpu")
    out = tmp_path / "two"
    partial = run_evaluation(out, n=5, methods=METHODS, batch_size=2, device="cpu", limit=1)
    assert [r["image"] for r in partial.rows] == ["0", "0"]
    before = (out / "results.jsonl").read_text().splitlines()

    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lrpkit.cli", "evaluate", "--num-images", "5", "--method", *METHODS, "--batch-size", "2",
           "--out", str(out), "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # pending images 1, 2, 3, 4 (image 0 was done): rank 0 takes positions 0, 2 -> images 1, 3; rank 1 images 2, 4
    assert "8 pairs computed in this run, 2 found in" in proc.stdout and "on 2 processes" in proc.stdout
    assert proc.stdout.count("metrics over 5 images") == 1  # only rank 0 reports

    assert not list(out.glob("results.rank*.jsonl"))  # merged into results.jsonl by rank 0
    after = (out / "results.jsonl").read_text().splitlines()
    assert after[:2] == before  # the finished image was not recomputed or rewritten
    got = keys(out / "results.jsonl")
    assert len(got) == len(set(got)) == 10
    by = {(r["image"], r["method"]): r["computed_by"] for r in map(json.loads, after[2:])}
    assert by == {(i, m): (0 if i in "13" else 1) for i in "1234" for m in METHODS}

    one, two = read_csv(tmp_path / "one" / "results.csv"), read_csv(out / "results.csv")
    assert [(r["image"], r["method"]) for r in one] == [(r["image"], r["method"]) for r in two]
    for a, b in zip(one, two):
        for col in ("target", "abpc", "morf", "lerf", "deletion", "insertion", "pointing", "mass", "rank"):
            assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-5, abs=1e-6), (a["image"], col)
    lines = proc.stdout.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("method"))
    assert lines[start:start + 3] == reference.table.splitlines()  # the printed table, digit for digit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, fail_rank, queue):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if rank == fail_rank:
        real = method_registry.make_method

        def make(name, model, prep, seed=0):
            explainer = real(name, model, prep, seed)
            state = {"images": 0}

            def explain(x, target=None):
                if state["images"] >= 1:
                    raise RuntimeError("simulated failure on this rank")
                state["images"] += x.shape[0]
                return explainer(x, target)

            return explain

        method_registry.make_method = make  # where the runner looks it up
    try:
        res = run_evaluation(out, n=4, methods=["gradient"], batch_size=1, device="cpu")
        queue.put((rank, "ok", res.computed))
    except Exception as err:  # noqa: BLE001 - reported to the test
        queue.put((rank, type(err).__name__, str(err)))


def _run_ranks(out, fail_rank):
    ctx = multiprocessing.get_context("fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(out), fail_rank, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (kind, value)) for r, kind, value in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank did not finish")
    return results


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_failing_rank_stops_all_ranks_and_the_run_resumes(tmp_path):
    out = tmp_path / "ev"
    results = _run_ranks(out, fail_rank=1)
    # rank 1 explains image 1, then fails on image 3; rank 0 finishes images 0 and 2, then hears of the failure
    assert results[1] == ("RuntimeError", "simulated failure on this rank")
    assert results[0][0] == "RuntimeError" and "rank 1 failed" in results[0][1] and "rerun to resume" in results[0][1]
    saved = keys(out / "results.rank0.jsonl") + keys(out / "results.rank1.jsonl")
    assert sorted(saved) == [("0", "gradient"), ("1", "gradient"), ("2", "gradient")]

    results = _run_ranks(out, fail_rank=None)
    # only image 3 is left: position 0 of the pending list, rank 0's; rank 1 has nothing to do
    assert results[0] == ("ok", 1) and results[1] == ("ok", 1)  # computed is the total over the ranks
    assert not list(out.glob("results.rank*.jsonl"))
    assert sorted(keys(out / "results.jsonl")) == [(str(i), "gradient") for i in range(4)]
    assert [r["image"] for r in read_csv(out / "results.csv")] == ["0", "1", "2", "3"]
