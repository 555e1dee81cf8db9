"""Training time measured alone: per-step intervals, the machine lease, the foreign-load probe, the timing cache."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from scipy import stats

from core.lease import FOREIGN_CORES, Lease, LoadProbe, foreign_gpu_processes, judge
from core.timer import Timer
from core.timing import measure_steps, per_step_interval, preserved, sample_batches, work_shape
from conftest import quick_config

LEASE_PY = Path(__file__).resolve().parents[1] / "core" / "lease.py"


def test_per_step_interval_is_student_t_over_repeats():
    repeats = [0.101, 0.097, 0.104, 0.099, 0.102]
    mean, low, high = per_step_interval(repeats)
    sd = math.sqrt(sum((r - 0.1006) ** 2 for r in repeats) / 4)
    half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert mean == pytest.approx(0.1006)
    assert (low, high) == pytest.approx((0.1006 - half, 0.1006 + half))
    one = per_step_interval([0.1])
    assert one[0] == 0.1 and math.isnan(one[1]) and math.isnan(one[2])


def test_warm_up_is_timed_apart_and_each_repeat_is_timed():
    calls = []

    def step(batch):
        calls.append(batch)
        time.sleep(0.15 if len(calls) == 1 else 0.01)  # the first step pays a start-up cost

    timing = measure_steps(step, ["a", "b"], warmup=2, repeats=3)
    assert len(calls) == 2 + 3 * 2
    assert len(timing.repeat_seconds) == 3 and timing.steps_per_repeat == 2
    assert timing.warmup_seconds >= 0.15
    assert 0.009 < timing.per_step < 0.05          # the start-up step is not in the mean
    assert timing.per_step_low <= timing.per_step <= timing.per_step_high
    assert timing.cpu_per_step < timing.per_step   # sleeping costs wall time, not CPU time
    record = timing.record(steps=100, extra=2.0)
    assert record["train_seconds"] == pytest.approx(100 * timing.per_step + 2.0, abs=1e-3)
    assert record["train_seconds_lo"] <= record["train_seconds"] <= record["train_seconds_hi"]


def _tiny_training(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    data = [(torch.randn(4, 8), torch.randint(0, 2, (4,))) for _ in range(6)]

    def step(batch):
        x, y = batch
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return params, optimizer, scheduler, data, step


def test_timing_before_training_leaves_the_run_unchanged():
    params, _, _, data, step = _tiny_training()
    for batch in data:
        step(batch)
    untimed = [p.detach().clone() for p in params]

    params, optimizer, scheduler, data, step = _tiny_training()
    with preserved(params, optimizer, scheduler):
        measure_steps(step, data[:2], warmup=1, repeats=2)
    assert optimizer.state_dict()["state"] == {} and scheduler.last_epoch == 0
    for batch in data:
        step(batch)
    for before, after in zip(untimed, params):
        assert torch.equal(before, after)  # bit for bit: weights, moments, schedule and dropout masks restored


def test_sample_spans_the_batch_costs():
    batches = list(range(100))
    chosen = sample_batches(batches, 5, cost=[(i * 37) % 100 for i in range(100)])
    assert sorted((i * 37) % 100 for i in chosen) == [10, 30, 50, 70, 90]
    assert sample_batches(batches[:3], 10) == [0, 1, 2]


def test_work_shape_ignores_what_does_not_change_the_cost():
    base = quick_config("m", "d", max_train_samples=200)
    same = base.replace(seed=7, scheduler="cosine", learning_rate=3e-4, warmup_ratio=0.1, epochs=3, weight_decay=0.0)
    assert work_shape(base, device="cpu") == work_shape(same, device="cpu")
    for other in (base.replace(freeze_depth=2), base.replace(batch_size=8), base.replace(max_length=64),
                  base.replace(max_train_samples=400)):
        assert work_shape(other, device="cpu") != work_shape(base, device="cpu")
    assert work_shape(base, device="cpu") != work_shape(base, device="cuda")


def test_a_shape_is_timed_once_and_shared_through_the_file_unless_contended(tmp_path):
    calls = []

    def step(batch):
        calls.append(batch)

    quiet = dict(repeats=2, steps=3, warmup=1, threshold=1e9)
    first = Timer(lease=Lease(tmp_path), **quiet).step_timing("shape-a", step, list(range(10)))
    assert len(calls) == 1 + 2 * 3 and not first.contended
    again = Timer(lease=Lease(tmp_path), **quiet).step_timing("shape-a", step, list(range(10)))  # another worker
    assert len(calls) == 7 and again == first
    quick = Timer(lease=Lease(tmp_path), **quiet | {"repeats": 1}).step_timing("shape-a", step, list(range(10)))
    assert len(calls) == 7 + 1 + 3 and math.isnan(quick.per_step_low)  # a quick look does not pass for a timing

    loud = dict(repeats=2, steps=3, warmup=1, threshold=-1.0)  # every reading counts as foreign load
    timer = Timer(lease=Lease(tmp_path), **loud)
    contended = timer.step_timing("shape-b", step, list(range(10)))
    assert contended.contended and "other processes kept" in contended.evidence
    assert timer.step_timing("shape-b", step, list(range(10))) is contended  # kept in memory for this process
    Timer(lease=Lease(tmp_path), **loud).step_timing("shape-b", step, list(range(10)))
    assert len(calls) == 11 + 2 * 7  # not in the file: the next process times it again


WORKER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("lease", sys.argv[1])
lease = sys.modules["lease"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lease)
out = open(sys.argv[3], "a", buffering=1)
with lease.Lease(sys.argv[2]).working() as held:
    for step in range(4000):
        held.pause_point()
        out.write(f"{time.monotonic()}\\n")
        time.sleep(0.005)
"""


def _steps(path: Path) -> list[float]:
    return [float(line) for line in path.read_text().split()] if path.exists() else []


def test_a_worker_pauses_while_another_process_holds_the_timing_lease(tmp_path):
    log = tmp_path / "steps.txt"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(LEASE_PY), str(tmp_path / "lease"), str(log)])
    try:
        deadline = time.monotonic() + 20
        while len(_steps(log)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_steps(log)) >= 5, "the worker never started stepping"
        lease = Lease(tmp_path / "lease")
        assert worker.pid in lease.worker_pids()
        with lease.exclusive():
            held = time.monotonic()
            time.sleep(0.6)
            released = time.monotonic()
        time.sleep(0.3)
        steps = _steps(log)
        assert not [t for t in steps if held + 0.05 < t < released]  # no step while the lease was held
        assert [t for t in steps if t > released]                    # and it went on afterwards
    finally:
        worker.kill()
        worker.wait()


def test_judge_separates_foreign_load_from_the_projects_own():
    # 1,000 ticks over 2 cores; 400 busy. The project used 380 of them: quiet. It used 200: 0.4 foreign cores.
    paused = judge(busy=400, total=1000, project=380, cores=2, others=0)
    assert paused.paused_cores == 0 and "other workers kept 0.00 cores busy" in paused.evidence
    running = judge(busy=400, total=1000, project=380, cores=2, others=180)  # the lease did not hold them
    assert running.paused_cores == pytest.approx(0.36) and "other workers kept 0.36 cores busy" in running.evidence
    quiet = judge(busy=400, total=1000, project=380, cores=2)
    assert not quiet.contended and quiet.foreign_cores == pytest.approx(0.04) and quiet.evidence.startswith("quiet")
    loaded = judge(busy=400, total=1000, project=200, cores=2)
    assert loaded.contended and loaded.foreign_cores == pytest.approx(0.4)
    assert "other processes kept 0.40 of 2 cores busy" in loaded.evidence
    assert judge(busy=0, total=1000, project=0, cores=2, gpu_processes=1).contended


def test_probe_reads_deltas_and_counts_paused_workers_as_the_projects():
    stat = iter([(1000, 5000), (1600, 6000)])           # 600 busy of 1000 ticks, 2 cores
    ticks = {os.getpid(): iter([10, 210]), 4242: iter([0, 350])}
    probe = LoadProbe(lambda: [4242], read_stat=lambda: next(stat), read_ticks=lambda pid: next(ticks[pid]),
                      cores=2)
    probe.start()
    result = probe.stop()
    assert result.foreign_cores == pytest.approx((600 - 200 - 350) / 1000 * 2) and not result.contended


def test_gpu_processes_other_than_the_projects_are_foreign():
    assert foreign_gpu_processes(None, [1]) == 0
    assert foreign_gpu_processes([1, 2, 99], [1, 2]) == 1
    assert foreign_gpu_processes([5001, 5002], [7]) == 1   # container: host PIDs, none of ours match


def test_probe_flags_a_cpu_hog_and_not_the_same_hog_registered_as_a_worker():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        as_foreign = LoadProbe(lambda: [])
        as_worker = LoadProbe(lambda: [hog.pid])
        as_foreign.start(), as_worker.start()
        time.sleep(1.5)
        foreign, worker = as_foreign.stop(), as_worker.stop()
    finally:
        hog.kill()
        hog.wait()
    hog_cores = worker.project_cores  # the hog's own ticks over the window, read from /proc/<pid>/stat
    if hog_cores <= FOREIGN_CORES:  # nothing to detect: the machine is saturated by others (it is contended)
        assert foreign.contended
        pytest.skip(f"the hog got only {hog_cores:.2f} cores on a saturated machine")
    assert foreign.contended and "other processes kept" in foreign.evidence
    assert foreign.foreign_cores >= hog_cores - 0.05
    # Same window, same background load (other helpers share this machine): registering the hog as a project
    # worker moves exactly its cores out of the foreign load.
    # (0.03: the two probes read /proc a moment apart; a tick over 1.5 s on 2 cores is 0.007 cores)
    assert worker.foreign_cores == pytest.approx(foreign.foreign_cores - hog_cores, abs=0.03)


def test_a_killed_workers_marker_does_not_make_the_process_that_reuses_its_pid_a_worker(tmp_path):
    """kill -9 leaves a worker's marker behind; the process that later gets its PID (any process: the PIDs wrap at
    32768 here) counted as one of the project's paused workers, so the load it made was taken out of a timing's
    foreign load, unmarked. A marker holds its worker's start time, and a process started at another time is not
    it. A live worker is still found."""
    lease = Lease(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "workers" / str(other.pid)).write_text("12345")  # the killed worker's, started long before
        assert other.pid not in lease.worker_pids()
        with lease.working():
            assert lease.worker_pids() == [os.getpid()]
    finally:
        other.kill()
        other.wait()

def test_a_worker_can_time_while_it_holds_its_own_shared_lock(tmp_path):
    import threading
    lease, done = Lease(tmp_path), []

    def work():
        with lease.working():
            with lease.exclusive():  # would wait for itself forever if its shared hold were kept
                done.append("timed")
            lease.pause_point()
            done.append("trained on")

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert done == ["timed", "trained on"]
    assert lease.worker_pids() == []  # unregistered once it stops working


def test_timing_check_flags_a_config_off_by_more_than_20_percent_unless_contended():
    from ablations.timing_check import compare

    def record(seconds, contended=False):
        return {"train_seconds": seconds, "train_loop_seconds": seconds, "contended": contended,
                "train_seconds_lo": seconds * 0.9, "train_seconds_hi": seconds * 1.1}

    alone = {(0, "linear", 42): record(10.0), (3, "linear", 42): record(5.0), (6, "linear", 42): record(1.0)}
    loaded = {(0, "linear", 42): record(11.5), (3, "linear", 42): record(7.0), (6, "linear", 42): record(2.0, True)}
    rows, broken = compare(alone, loaded)
    assert broken == 1 and len(rows) == 3          # depth 3: 1.40x and not contended
    assert "| ✗ |" in rows[1] and "| ✓ |" in rows[0] and "| ✓ |" in rows[2]
    # With nothing but the project's own workers running, a contended mark is itself a failure: they must not
    # count as foreign load, so a timing they "contend" means the lease did not keep them out.
    rows, broken = compare(alone, loaded, quiet=True)
    assert broken == 2 and "| ✓ |" in rows[0] and "| ✗ |" in rows[2]


def test_timing_check_shows_the_load_each_timing_ran_beside_and_when():
    """The demo's claims about load (foreign cores while A was timed, B's other workers paused) and time (how much
    later a rerun came) were read off the records once and not stored: the table carries them."""
    from ablations.timing_check import compare, timed_at

    def record(seconds, foreign, paused=None, at="2026-11-28T12:00:00Z"):
        timing = {"foreign_cores": foreign, "measured_at": at, **({} if paused is None else {"paused_cores": paused})}
        return {"train_seconds": seconds, "train_loop_seconds": seconds, "timing": timing}

    alone = {(0, "linear", 42): record(10.0, 0.013)}
    loaded = {(0, "linear", 42): record(10.5, 0.021, 0.004, "2026-11-28T12:31:00Z")}
    rows, _ = compare(alone, loaded, quiet=True)
    assert rows[0].endswith("| ✓ | 0.01 | 0.02 | 0.00 | — |")
    assert compare(alone, {(0, "linear", 42): {"train_seconds": 10.0, "train_loop_seconds": 10.0}})[0][0].endswith(
        "| — | — | — |")
    built = {**loaded[(0, "linear", 42)], "contended": True, "prefix_cache": {
        "cached": True, "contended": "other processes kept 0.51 of 2 cores busy (threshold 0.25); the project's "
                                     "other workers kept 0.00 cores busy"}}
    assert compare(alone, {(0, "linear", 42): built})[0][0].endswith("| 0.02 | 0.00 | 0.51 cores ⚠ |")
    assert timed_at(list(alone.values()) + list(loaded.values())) == \
        "2026-11-28 12:00:00 to 2026-11-28 12:31:00 UTC"


def test_a_frozen_prefix_is_built_alone_and_a_contended_build_marks_the_run(tiny_bert, toy_data, tmp_path, monkeypatch):
    """The prefix build counts in train_seconds, so the train split's prefix is built under the exclusive lease like
    the timed steps (without it, two workers put depth 6 at 2.2x its time alone, unmarked), and foreign load during
    the build marks the run contended. A quiet build is kept with its shape's step timing, and a later run whose
    steps come from that timing is charged that build, not its own made under load (steps and build then come from
    one moment; before, a reused step timing was added to a build taken hours later under other load)."""
    import core.prefix_cache
    import core.prepare
    import core.train
    from core.lease import Contention
    from core.session import Session

    def session(folder=tmp_path) -> Session:
        made = Session()
        made._timer = Timer(lease=Lease(folder), repeats=2, steps=2, warmup=1, threshold=1e9)
        return made

    first, builds = session(), []
    real = core.prepare.prefix_states

    def spy(cache, model, backbone, split, key, *rest):
        builds.append((key[2], first.timer.lease._exclusive > 0))
        return real(cache, model, backbone, split, key, *rest)

    monkeypatch.setattr(core.prepare, "prefix_states", spy)
    config = quick_config(tiny_bert, toy_data, freeze_depth=1)
    record = core.train.run(config, device="cpu", progress=False, session=first)
    assert ("train", True) in builds and not record.contended and "under load" not in record.summary()
    assert all(not alone for name, alone in builds if name != "train")  # evaluation's builds: no lease needed
    build = record.prefix_cache["seconds"]["train"]
    assert record.timing["prefix_seconds"] == build == record.timing["extra_seconds"]

    solo = Timer.solo

    def loud(self, fn, device="cpu"):
        result, seconds, _ = solo(self, fn, device)
        return result, seconds, Contention(contended=True, foreign_cores=1.0, project_cores=0.0, cores=2,
                                           gpu_processes=0, evidence="other processes kept 1.00 of 2 cores busy")

    def slowed(*args, **kwargs):  # the load slows the build down
        time.sleep(0.5)
        return run_layers(*args, **kwargs)

    monkeypatch.setattr(Timer, "solo", loud)
    run_layers = core.prefix_cache._run_layers
    monkeypatch.setattr(core.prefix_cache, "_run_layers", slowed)
    again = core.train.run(config, device="cpu", progress=False, session=session())  # steps: timed, from the file
    assert not again.contended and "prefix_evidence" not in again.timing  # charged the quiet build kept with them
    assert again.timing["extra_seconds"] == build < again.prefix_cache["seconds"]["train"] - 0.4
    assert again.train_seconds == pytest.approx(again.timing["steps"] * again.timing["per_step"] + build, abs=2e-3)
    assert again.history[0]["train_seconds"] == again.train_seconds  # the epoch (what a search prunes on) alike

    fresh = core.train.run(config, device="cpu", progress=False, session=session(tmp_path / "fresh"))
    assert fresh.contended and "1.00 of 2 cores" in fresh.timing["prefix_evidence"]  # no quiet build to stand in
    assert "⚠ timed under load" in fresh.summary()  # what `python -m core` prints: it said nothing of the load
    assert not fresh.timing["contended"]  # the steps themselves were timed quietly
    assert fresh.timing["prefix_seconds"] is None  # a loaded build is not kept for later runs


def test_a_shape_timed_before_in_the_session_is_not_set_up_again(tiny_bert, toy_data, tmp_path, monkeypatch):
    """The second run of a work shape takes its timing from the session: no snapshot of the model and optimizer
    is taken and put back for it, and its record carries the first run's timing."""
    import core.timing
    import core.train
    from core.session import Session

    session = Session()
    session._timer = Timer(lease=Lease(tmp_path), repeats=2, steps=2, warmup=1, threshold=1e9)
    snapshots, real = [], core.timing.preserved

    def counted(*args, **kwargs):
        snapshots.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(core.timing, "preserved", counted)
    config = quick_config(tiny_bert, toy_data)
    first = core.train.run(config, device="cpu", progress=False, session=session)
    assert len(snapshots) == 1
    second = core.train.run(config.replace(seed=1, scheduler="cosine"), device="cpu", progress=False, session=session)
    assert len(snapshots) == 1  # the same work shape: known, so nothing to set up
    assert second.timing == first.timing and second.train_seconds == first.train_seconds
    third = core.train.run(config.replace(batch_size=8), device="cpu", progress=False, session=session)
    assert len(snapshots) == 2 and third.timing["shape"] != first.timing["shape"]  # a new shape is timed


def test_the_grids_duration_probe_times_its_steps_with_measure_steps(tiny_bert, toy_data, tmp_path, monkeypatch):
    """One measurement path: the probe's warm-up step and its timed steps go through measure_steps, and its answer
    is the median of the timed steps (of 3, one slow step does not set the estimate)."""
    import statistics

    import core.timing
    from core.session import Session

    passes, measure = [], core.timing.measure_steps

    def spy(*args, **kwargs):
        passes.append(measure(*args, **kwargs))
        return passes[-1]

    monkeypatch.setattr(core.timing, "measure_steps", spy)
    session = Session()
    session._timer = Timer(lease=Lease(tmp_path))
    step, rows = core.timing.seconds_per_training_step(quick_config(tiny_bert, toy_data), session, "cpu", steps=3)
    assert len(passes) == 1 and passes[0].warmup_steps == 1 and passes[0].steps_per_repeat == 1
    assert len(passes[0].repeat_seconds) == 3 and step == statistics.median(passes[0].repeat_seconds) > 0
    assert rows == len(session.text_data(toy_data, session.tokenizer(tiny_bert), None, None, 32).splits["train"])


def test_timing_passes_divide_by_the_baselines_pass_nearest_in_time():
    """A study extended hours later holds two passes per shape; a speed-up divides by the baseline's pass taken
    nearest in time, never by one from hours before."""
    from ablations.timing_passes import markdown, rows

    def record(depth, at, seconds, shape):
        return {"config": {"model": "m", "dataset": "d", "freeze_depth": depth, "batch_size": 16, "max_length": 128,
                           "max_train_samples": 2000, "precision": "fp32"}, "device": "cpu", "train_samples": 2000,
                "train_seconds": seconds, "timing": {"measured_at": at, "shape": shape}}
    records = [record(0, "2026-01-01T10:00:00Z", 40.0, "a"), record(0, "2026-01-01T10:00:00Z", 40.0, "a"),
               record(4, "2026-01-01T10:05:00Z", 16.0, "b"), record(4, "2026-01-01T10:05:00Z", 14.0, "b"),
               record(0, "2026-01-01T14:00:00Z", 33.0, "c"), record(4, "2026-01-01T14:02:00Z", 22.0, "d"),
               record(6, "2026-01-01T14:03:00Z", 8.0, "e"),  # depth 6 only in the second pass
               {**record(2, "", 9.0, "f"), "timing": None}]  # untimed: no pass
    table = rows(records)
    assert [(r["freeze_depth"], r["pass"], r["runs"], r["train_seconds"]) for r in table] == [
        (0, 1, 2, 40.0), (0, 2, 1, 33.0), (4, 1, 2, 15.0), (4, 2, 1, 22.0), (6, 1, 1, 8.0)]
    assert [r["speedup"] for r in table] == [1.0, 1.0, 40.0 / 15.0, 1.5, 33.0 / 8.0]  # depth 6: the 14:00 pass
    assert "| 4 | 2 | 2026-01-01 14:02:00 | 1 | 22.0 | 1.50× (2026-01-01 14:00:00) |" in markdown(table)



def test_a_worker_whose_sitting_waited_for_another_workers_sitting_of_the_same_shapes_reads_it(tmp_path):
    """Two workers of one grid start at once: both find its shapes untimed and ask for a sitting of all of them. The
    second, let in once the first is done, read nothing the first saved and timed every shape again (`replace`),
    so the study's runs split between two sittings. Now it reads them; where the saved timings are not one sitting
    of them all (one shape missing, or two passes) it still times every shape together."""
    import json
    calls = []

    def step(batch):
        calls.append(batch)

    steps, batches = {"a": step, "b": step}, {"a": [1, 2], "b": [3, 4]}

    def worker():
        return Timer(lease=Lease(tmp_path), repeats=2, steps=2, warmup=1, threshold=1e9)
    first = worker().interleaved(steps, batches, save=True, replace=True)
    timed = len(calls)
    assert worker().interleaved(steps, batches, save=True, replace=True) == first and len(calls) == timed
    saved = json.loads((tmp_path / "timings.json").read_text())
    key = next(k for k in saved if k.startswith("a:"))
    saved[key]["measured_at"] = "2000-01-01T00:00:00Z"  # shape a from an older pass
    (tmp_path / "timings.json").write_text(json.dumps(saved))
    again = worker().interleaved(steps, batches, save=True, replace=True)
    assert len(calls) == 2 * timed and len({t.measured_at for t in again.values()}) == 1
    before = len(calls)  # a new shape c beside a and b, timed in one sitting: all three timed again
    worker().interleaved(steps | {"c": step}, batches | {"c": [5]}, save=True, replace=True)
    assert len(calls) - before == 3 * 1 + 2 * (2 + 2 + 1)  # one warm-up step each, two rounds of every batch

def test_interleaved_steps_time_every_shape_once_per_round_in_turn():
    from core.timing import interleaved_steps
    calls = []
    fns = {name: (lambda batch, name=name: calls.append((name, batch))) for name in ("a", "b")}
    timings = interleaved_steps(fns, {"a": [1, 2], "b": [3]}, warmup=1, rounds=3)
    assert calls == [("a", 1), ("b", 3)] + [("a", 1), ("a", 2), ("b", 3)] * 3  # warm-up, then a round is a, b
    assert {k: len(t.repeat_seconds) for k, t in timings.items()} == {"a": 3, "b": 3}
    assert {k: (t.steps_per_repeat, t.sitting, t.warmup_steps) for k, t in timings.items()} == {
        "a": (2, 2, 1), "b": (1, 2, 1)}
    assert not any(t.contended for t in timings.values())


def test_an_interleaved_check_times_each_shape_of_a_study_again(tiny_bert, toy_data):
    """One run per shape prepared again and timed round-robin; the baseline's speed-up is exactly 1 (its own
    rounds), a frozen depth's comes with an interval over paired rounds, and train s = steps x per step + prefix."""
    from ablations.timing_passes import interleaved, interleaved_markdown
    from core import run
    from core.session import Session
    session = Session(timing_repeats=1)
    records = [run(quick_config(tiny_bert, toy_data, freeze_depth=d, epochs=1), progress=False,
                   session=session).to_dict() for d in (0, 1, 0)]
    rows = interleaved(records, Session(timing_repeats=1), "cpu", rounds=3)
    assert [r["freeze_depth"] for r in rows] == [0, 1] and all(r["rounds"] == 3 for r in rows)
    assert rows[0]["speedup"] == rows[0]["speedup_low"] == rows[0]["speedup_high"] == 1.0
    assert rows[1]["speedup_low"] <= rows[1]["speedup"] <= rows[1]["speedup_high"]
    assert rows[1]["prefix_seconds"] > 0 and rows[0]["prefix_seconds"] == 0.0
    for row in rows:
        assert row["train_seconds"] == pytest.approx(row["steps"] * row["per_step"] + row["prefix_seconds"])
    assert "| 1 |" in interleaved_markdown(rows)


def test_timing_passes_of_a_study_without_runs_is_one_line(tmp_path, monkeypatch):
    import sys

    from ablations import timing_passes
    from core import UsageError
    optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path}/x.db")
    monkeypatch.setattr(sys, "argv", ["timing_passes", "--storage", f"sqlite:///{tmp_path}/x.db",
                                      "--study-name", "empty", "--interleave"])
    with pytest.raises(UsageError, match="study 'empty' has no completed runs"):
        timing_passes.main()


def test_timing_passes_keep_shapes_that_cost_differently_apart_and_sort_depths_as_numbers():
    """Epochs, frozen dropout (no prefix cache) or another batch size make another shape with its own baseline;
    depth 10 comes after depth 2."""
    from ablations.timing_passes import rows

    def record(depth, seconds, **config):
        return {"config": {"model": "m", "freeze_depth": depth, "epochs": 1, "batch_size": 16, "seed": 1,
                           "frozen_dropout": False, **config}, "device": "cpu", "train_samples": 100,
                "train_seconds": seconds, "timing": {"measured_at": "2026-01-01T10:00:00Z", "shape": str(config)}}
    table = rows([record(0, 30.0), record(0, 90.0, epochs=3), record(2, 10.0), record(2, 45.0, epochs=3),
                  record(10, 3.0), record(2, 20.0, frozen_dropout=True), record(0, 60.0, frozen_dropout=True)])
    assert [(r["freeze_depth"], r["train_seconds"], r["speedup"]) for r in table] == [
        (0, 30.0, 1.0), (0, 90.0, 1.0), (0, 60.0, 1.0), (2, 10.0, 3.0), (2, 45.0, 2.0), (2, 20.0, 3.0),
        (10, 3.0, 10.0)]


def test_a_sitting_times_every_new_shape_together_once_and_its_runs_read_that_timing(tiny_bert, toy_data,
                                                                                        monkeypatch):
    """core.sitting.sitting: one timing per work shape (seeds and schedules share theirs), all taken in one
    round-robin sitting and saved; the runs then take no timing of their own, and a second sitting finds nothing
    left to time."""
    from core import run, timer
    from core.session import Session
    from core.sitting import sitting
    from core.timer import Timer

    def time_shapes(configs, session, device, progress=None):
        return {t.key: t.timing for t in sitting(configs, session, device, progress=progress)}

    def quiet_session():  # foreign load on a shared test machine must not keep the timings from being saved
        session = Session(timing_repeats=2)
        session._timer = Timer(repeats=2, steps=3, warmup=1, threshold=1e9)
        return session
    session = quiet_session()
    configs = [quick_config(tiny_bert, toy_data, freeze_depth=d, seed=s, scheduler=k)
               for d in (0, 1) for s in (0, 1) for k in ("linear", "cosine")]
    taken = time_shapes(configs, session, "cpu", progress=None)
    assert len(taken) == 2 and {t.sitting for t in taken.values()} == {2}
    assert {len(t.repeat_seconds) for t in taken.values()} == {2}
    monkeypatch.setattr(timer, "measure_steps", lambda *a, **k: pytest.fail("a run timed its shape again"))
    records = [run(c, progress=False, session=session) for c in configs[::3]]
    assert {r.timing["sitting"] for r in records} == {2}
    assert {r.timing["measured_at"] for r in records} == {t.measured_at for t in taken.values()}
    assert {r.timing["shape"] for r in records} == set(taken)
    import core.prepare
    monkeypatch.setattr(core.prepare, "prepare", lambda *a, **k: pytest.fail("a sitting with nothing to time prepared"))
    assert time_shapes(configs, session, "cpu", progress=None) == {}
    assert time_shapes(configs, quiet_session(), "cpu", progress=None) == {}  # read from the machine's file


def test_a_sitting_before_a_run_changes_nothing_the_run_computes(tiny_bert, toy_data, tmp_path):
    """The sitting's steps run on models of their own and the random state is put back: the run after it equals
    the same run without it (weights, predictions, every epoch's metrics), and its frozen prefix is reused."""
    from core import run
    from core.session import Session
    from core.lease import Lease
    from core.sitting import sitting
    from core.timer import Timer
    config = quick_config(tiny_bert, toy_data, freeze_depth=1, epochs=2)
    plain = run(config, progress=False, session=Session(timing_repeats=1)).to_dict()
    session = Session(timing_repeats=1)
    session._timer = Timer(lease=Lease(tmp_path), repeats=1)  # a machine without the plain run's timing
    torch.manual_seed(0)
    sitting([config], session, "cpu", progress=None)
    assert session.prefix_cache.entries  # built by the sitting, alone, as the run would have
    after = run(config, progress=False, session=session).to_dict()
    assert after["validation_predictions"] == plain["validation_predictions"]
    strip = ("train_seconds", "loop_seconds")
    assert [{k: v for k, v in e.items() if k not in strip} for e in after["history"]] == \
        [{k: v for k, v in e.items() if k not in strip} for e in plain["history"]]
    assert after["accuracy"] == plain["accuracy"] and after["timing"]["sitting"] == 1


def test_timing_passes_interleave_store_keeps_the_sitting_and_the_studys_runs_read_their_time_from_it(
        tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    """`--interleave --store` on a study of real runs: the sitting is kept with the study and load_runs gives each
    run steps x the sitting's per-step time (+ its prefix build); --store alone is one line."""
    import functools
    import sys

    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    import core.timer
    from ablations import timing_passes
    from ablations.storage import load_runs
    from ablations.stored_sitting import sitting_key
    from core import UsageError, run
    from core.lease import LoadProbe
    from core.session import Session
    session = Session(timing_repeats=1)
    records = [run(quick_config(tiny_bert, toy_data, freeze_depth=d, epochs=1), progress=False,
                   session=session).to_dict() for d in (0, 1)]
    url = f"sqlite:///{tmp_path}/x.db"
    study = optuna.create_study(study_name="s", storage=url, directions=["maximize", "minimize"])
    for record in records:
        study.add_trial(create_trial(params={"freeze_depth": record["config"]["freeze_depth"]},
                                     distributions={"freeze_depth": IntDistribution(0, 2)},
                                     values=[record["accuracy"], record["train_seconds"]],
                                     user_attrs={"run_id": record["run_id"], "record": record}))
    monkeypatch.setattr(core.timer, "LoadProbe", functools.partial(LoadProbe, threshold=1e9))  # a busy test box
    command = ["timing_passes", "--storage", url, "--study-name", "s", "--rounds", "2"]
    monkeypatch.setattr(sys, "argv", command + ["--store"])
    with pytest.raises(UsageError, match="--store keeps a sitting: add --interleave"):
        timing_passes.main()
    gpu = optuna.create_study(study_name="gpu", storage=url, directions=["maximize", "minimize"])
    gpu.add_trial(create_trial(params={"freeze_depth": 0}, distributions={"freeze_depth": IntDistribution(0, 2)},
                               values=[0.5, 1.0], user_attrs={"run_id": "x", "record": {
                                   **records[0], "device": "cuda (NVIDIA H100 80GB HBM3)"}}))
    monkeypatch.setattr(sys, "argv", command[:3] + ["--study-name", "gpu", "--interleave", "--store", "--rounds", "2"])
    with pytest.raises(UsageError, match="the study ran on cuda .* stands in only for times taken on its own"):
        timing_passes.main()
    assert "timing_sitting" not in optuna.load_study(study_name="gpu", storage=url).user_attrs
    monkeypatch.setattr(sys, "argv", command)
    assert timing_passes.main() == 0 and "stored sitting" not in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", command + ["--interleave", "--store"])
    assert timing_passes.main() == 0
    assert "stored with study 's'" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", command)  # the listing of passes names the stored sitting that replaces them
    assert timing_passes.main() == 0 and "holds a stored sitting of 2 work shapes" in capsys.readouterr().out
    sitting = optuna.load_study(study_name="s", storage=url).user_attrs["timing_sitting"]
    assert len(sitting["shapes"]) == 2
    for record in (r["record"] for r in load_runs(url, ["s"])):
        shape = sitting["shapes"][sitting_key(record["config"], record["device"], record["train_samples"])]
        assert record["timing"]["sitting"] == 2 and record["timing"]["measured_at"] == sitting["measured_at"]
        assert record["train_seconds"] == pytest.approx(
            record["timing"]["steps"] * shape["per_step"] + shape["prefix_seconds"], abs=1e-3)
        assert record["timing"]["pass"]["train_seconds"] == next(
            r["train_seconds"] for r in records if r["run_id"] == record["run_id"])


def grid_runner(model: str, data: str, url: str, out, monkeypatch, capsys):
    """`python -m ablations.grid` in this process, timing under a load probe that sees no load (a busy test box),
    over one storage: call it with further flags, it returns what the grid printed."""
    import functools
    import sys

    import core.timer
    from ablations import grid
    from core.cli import main_guard
    from core.lease import LoadProbe
    monkeypatch.setattr(core.timer, "LoadProbe", functools.partial(LoadProbe, threshold=1e9))
    common = ["--model", model, "--dataset", data, "--schedulers", "linear", "--epochs", "1", "--precision", "fp32",
              "--max-length", "32", "--storage", url, "--output-dir", str(out), "--no-progress", "--no-report",
              "--timing-repeats", "2"]

    def run(*flags: str) -> str:
        monkeypatch.setattr(sys, "argv", ["grid", *common, *flags])
        with pytest.raises(SystemExit) as exit_:
            main_guard(grid.main)
        assert exit_.value.code == 0
        return capsys.readouterr().out
    return run


def test_a_grid_extending_a_study_times_old_and_new_shapes_in_one_sitting_stored_with_it(
        tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    """A study extended with a new depth: the new shape needs a timing, so every shape of the study (the stored
    depth 0 too) is timed in one sitting, which is stored with the study; its report then times the old run
    from it as well (the pass it replaced kept). Resuming with nothing new to time takes no sitting."""
    from ablations.storage import load_runs
    url = f"sqlite:///{tmp_path}/x.db"
    grid = grid_runner(tiny_bert, toy_data, url, tmp_path, monkeypatch, capsys)

    def run_grid(depths):
        return grid("--freeze-depths", depths)
    first = run_grid("0")
    assert "timing 1 work shape(s) together" in first and "stored with it" not in first
    (old,) = [r["record"] for r in load_runs(url)]
    second = run_grid("0,1")
    assert "timing 2 work shape(s) together" in second and "this sitting of its 2 shapes is stored" in second
    sitting = optuna.load_study(study_name="grid", storage=url).user_attrs["timing_sitting"]
    records = {r["record"]["config"]["freeze_depth"]: r["record"] for r in load_runs(url)}
    assert {r["timing"]["measured_at"] for r in records.values()} == {sitting["measured_at"]}
    assert records[0]["timing"]["pass"] == {"measured_at": old["timing"]["measured_at"],
                                            "train_seconds": old["train_seconds"], "sitting": 1}
    assert records[1]["timing"]["sitting"] == 2  # the new run read the sitting's timing as it trained
    assert "work shape(s) together" not in run_grid("0,1")  # all stored: nothing to time, no new sitting


def test_a_grid_copying_another_studys_runs_times_them_in_its_own_sitting_stored_with_it(
        tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    """Study b copies its depth-0 run from study a (same storage) and trains depth 1: the sitting times both shapes
    together and is stored with b, so b's report reads both runs' times from one sitting (before, the copy kept a's
    older pass while the new run read the new one). Study a is left as it was."""
    from ablations.storage import load_runs
    url = f"sqlite:///{tmp_path}/x.db"
    grid = grid_runner(tiny_bert, toy_data, url, tmp_path, monkeypatch, capsys)

    def run_grid(study, depths):
        return grid("--study-name", study, "--freeze-depths", depths)
    run_grid("a", "0")
    (old,) = [r["record"] for r in load_runs(url, ["a"])]
    second = run_grid("b", "0,1")
    assert "1 reused from other studies" in second
    assert "timing 2 work shape(s) together" in second and "this sitting of its 2 shapes is stored" in second
    sitting = optuna.load_study(study_name="b", storage=url).user_attrs["timing_sitting"]
    records = {r["record"]["config"]["freeze_depth"]: r["record"] for r in load_runs(url, ["b"])}
    assert {r["timing"]["measured_at"] for r in records.values()} == {sitting["measured_at"]}
    # The copy's own pass is kept beside the sitting's time (measured_at has whole seconds: both grids of these tiny
    # models may finish within one, so the sitting is told from the old pass by its measured steps)
    copy = records[0]["timing"]
    assert copy["pass"] == {"measured_at": old["timing"]["measured_at"], "train_seconds": old["train_seconds"],
                            "sitting": old["timing"].get("sitting", 1)}
    assert copy["sitting"] == 2 and copy["repeat_seconds"] != old["timing"]["repeat_seconds"]
    assert [r["record"] for r in load_runs(url, ["a"])] == [old]  # a's own report is unchanged


def test_a_search_that_may_copy_another_studys_runs_stores_its_sitting(tiny_bert, toy_data, tmp_path, monkeypatch):
    """The search learns which runs it copies only as it asks: where another study of the storage holds timed runs
    of a shape it is about to train, its sitting is stored with it; where none does, it is not (unchanged). A grid
    names the runs it copies (`copied`, here none): another study's runs of its shapes alone store nothing."""
    import functools

    import core.timer
    from ablations.cells import run_cells
    from ablations.ledger import Ledger, open_study
    from ablations.storage import open_storage
    from ablations.stored_sitting import time_study
    from core import run
    from core.lease import LoadProbe
    from core.session import Session
    monkeypatch.setattr(core.timer, "LoadProbe", functools.partial(LoadProbe, threshold=1e9))  # a busy test box
    url = f"sqlite:///{tmp_path}/x.db"
    ledger = Ledger(open_storage(url))
    base = quick_config(tiny_bert, toy_data, freeze_depth=0)
    run_cells([base], open_study(ledger.storage, "grid"), ledger,
              lambda c, _: run(c, session=Session(timing_repeats=2), progress=False).to_dict(), progress=False)
    for name, config, copied, stored in [("other", base.replace(freeze_depth=1), None, False),
                                         ("search", base, None, True), ("grid-2", base, set(), False)]:
        open_study(ledger.storage, name)
        monkeypatch.setenv("ABLATIONS_TIMING_DIR", str(tmp_path / name))  # a machine with no timing of the shape
        said = []
        assert time_study(url, name, [config], Session(timing_repeats=2), "cpu", progress=said.append, copied=copied)
        held = optuna.load_study(study_name=name, storage=url).user_attrs.get("timing_sitting")
        assert (held is not None) == stored, name
        assert any("this sitting of its one shape is stored with it" in line for line in said) == stored, said


@pytest.mark.parametrize("changes", [dict(freeze_depth=0), dict(freeze_depth=1), dict(freeze_depth=1, dev_size=0.25),
                                     dict(freeze_depth=1, frozen_dropout=True), dict(max_train_samples=20, seed=3)])
def test_a_runs_timing_key_is_known_before_it_is_prepared(tiny_bert, toy_data, changes):
    """core.train.planned_shape (no model, no prefix build) gives the key timing_shape gives the prepared run."""
    from core.session import Session
    from core.prepare import prepare
    from core.train import planned_shape, timing_shape
    config, session = quick_config(tiny_bert, toy_data, **changes), Session()
    assert planned_shape(config, session, "cpu") == timing_shape(prepare(config, session, "cpu", False, True), False)


def test_a_study_whose_shapes_were_timed_by_different_sittings_times_them_together_again(
        tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    """Depth 0 timed by grid a, depth 1 by grid b a while later: grid c of both depths found both shapes timed and
    took no sitting, so its report divided a's pass by b's (whether it copied every run or trained new seeds). Now
    its shapes are timed together again, the sitting stored with it, and every run of c reads one sitting; a rerun
    with nothing to train takes none."""
    import time

    from ablations.storage import load_runs
    url = f"sqlite:///{tmp_path}/x.db"
    grid = grid_runner(tiny_bert, toy_data, url, tmp_path, monkeypatch, capsys)
    grid("--study-name", "a", "--freeze-depths", "0")
    time.sleep(1.1)  # measured_at has whole seconds: two passes
    grid("--study-name", "b", "--freeze-depths", "1")
    for study, seeds in [("more-seeds", "2"), ("copies", "1")]:
        said = grid("--study-name", study, "--freeze-depths", "0,1", "--seeds", seeds)
        assert "timing 2 work shape(s) together" in said and "this sitting of its 2 shapes is stored" in said
        assert ("estimate from the timing" in said) == (study == "more-seeds")  # none for nothing to train
        records = [r["record"] for r in load_runs(url, [study])]
        assert len(records) == 2 * int(seeds)
        assert len({r["timing"]["measured_at"] for r in records}) == 1, study
        assert "work shape(s) together" not in grid("--study-name", study, "--freeze-depths", "0,1", "--seeds", seeds)


def test_a_prefix_build_charged_from_a_loaded_build_is_marked_whether_derived_or_reused(tiny_bert, toy_data,
                                                                                         monkeypatch):
    """Depth 1's frozen prefix built under foreign load; depth 2's is derived from it (its build_seconds include
    depth 1's) and a later seed reuses depth 2's: both records charge that loaded build, so both are contended with
    the build's evidence. Before, only the run whose own build met the load said so: the derived and the reused
    ones, timed quietly, read as alone."""
    import functools

    import core.timer
    from core import run
    from core.lease import LoadProbe
    from core.session import Session
    session = Session(timing_repeats=2)
    monkeypatch.setattr(core.timer, "LoadProbe", functools.partial(LoadProbe, threshold=-1.0))  # always loaded
    assert run(quick_config(tiny_bert, toy_data, freeze_depth=1), progress=False, session=session).contended
    monkeypatch.setattr(core.timer, "LoadProbe", functools.partial(LoadProbe, threshold=1e9))  # quiet from now on
    derived = run(quick_config(tiny_bert, toy_data, freeze_depth=2), progress=False, session=session)
    reused = run(quick_config(tiny_bert, toy_data, freeze_depth=2, seed=1), progress=False, session=session)
    assert not derived.timing["contended"] and derived.prefix_cache["reused"]["train"] is False
    assert reused.prefix_cache["reused"]["train"] is True
    for record in (derived, reused):
        assert record.contended and "other processes kept" in record.timing["prefix_evidence"]


def test_a_sitting_whose_frozen_prefix_build_met_load_is_not_stored_with_the_study(tiny_bert, toy_data, tmp_path,
                                                                                  monkeypatch, capsys):
    """The steps of an extension's sitting timed quietly, but depth 1's frozen-prefix build for it met foreign load:
    the sitting was stored all the same, and the study's report charged every depth-1 run that build as timed
    alone (retimed: contended false). Now such a sitting is contended, not stored (one line says so), and the run
    that was charged the build is marked."""
    import core.timer
    from ablations.storage import load_runs
    from core.lease import Contention
    url = f"sqlite:///{tmp_path}/x.db"
    grid = grid_runner(tiny_bert, toy_data, url, tmp_path, monkeypatch, capsys)
    grid("--freeze-depths", "0")
    solo = core.timer.Timer.solo

    def loaded_solo(self, fn, device="cpu"):
        result, seconds, _ = solo(self, fn, device)
        return result, seconds, Contention(True, 1.0, 1.0, 2, 0, "other processes kept 1.00 of 2 cores busy")
    monkeypatch.setattr(core.timer.Timer, "solo", loaded_solo)
    said = grid("--freeze-depths", "0,1")
    assert "timing 2 work shape(s) together" in said and "not stored" in said and "frozen-prefix build" in said
    assert "timing_sitting" not in optuna.load_study(study_name="grid", storage=url).user_attrs
    records = {r["record"]["config"]["freeze_depth"]: r["record"] for r in load_runs(url)}
    assert records[1]["contended"] and not records[0]["contended"]


def test_loading_and_preparing_outside_a_run_count_as_a_project_worker(tiny_bert, toy_data, tmp_path, monkeypatch):
    """Two grid workers started together: one loading its model and data, or preparing its sitting's runs (seconds
    of a core, no pause point), while the other built a frozen prefix alone made that build contended
    (results/timing/show-workers.md: 4 of 6 configs marked). Both now hold the lease's shared lock: the other's
    timing waits for them to end, and cannot start while they run."""
    import contextlib

    import core.prepare
    from core.model import preflight
    from core.session import Session
    from core.sitting import prepared_shapes

    session = Session()
    session._timer = Timer(lease=Lease(tmp_path), repeats=1, steps=1, warmup=0, threshold=1e9)
    registered = []
    real_tokenizer, real_prepare = session.tokenizer, core.prepare.prepare
    monkeypatch.setattr(session, "tokenizer", lambda name: registered.append(session.timer.lease.worker_pids())
                        or real_tokenizer(name))
    config = quick_config(tiny_bert, toy_data, freeze_depth=1)
    preflight(config, session)
    assert registered == [[os.getpid()]] and session.timer.lease.worker_pids() == []

    def prepare(*args, **kwargs):
        registered.append(session.timer.lease.worker_pids())
        return real_prepare(*args, **kwargs)
    monkeypatch.setattr(core.prepare, "prepare", prepare)
    with contextlib.ExitStack() as views:
        prepared_shapes({"shape": config}, session, "cpu", views)
    assert registered[1] == [os.getpid()] and session.timer.lease.worker_pids() == []
