"""The numbers the READMEs quote from results/ are the stored ones: every generated report folder is rewritten by
`bash results/reproduce.sh report`, and the figures quoted by hand (the headline table, the sitting's speed-ups,
the CPU step times) are read back from the files they come from. Reads committed files only: no training."""
from __future__ import annotations

import json
import re
import statistics
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def report_stage() -> str:
    script = (RESULTS / "reproduce.sh").read_text()
    return re.search(r"^report\)(.*?);;", script, flags=re.S | re.M).group(1)


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| **") or re.match(r"\| \d+ \| ", line)]


def test_every_generated_report_folder_is_rewritten_by_the_report_stage():
    stage = report_stage()
    written = {Path(folder) for folder in re.findall(r"--output-dir (\S+)", stage)}
    written |= {Path(folder) for folder in re.findall(r"rewrite_search_outputs\(.*?'(results/[^']+)'\)", stage)}
    generated = {path.parent.relative_to(ROOT) for path in RESULTS.rglob("tradeoff.md")}
    generated |= {path.parent.relative_to(ROOT) for path in RESULTS.rglob("search_summary.md")
                  if "search-2000" not in path.parts}  # search-2000: two throwaway storages, not kept (README 5b)
    assert generated - written == set(), "report folders no command in reproduce.sh rewrites (they go stale)"


def test_the_headline_table_is_the_generated_one():
    readme = table_rows((ROOT / "README.md").read_text().split("## Install")[0])
    assert readme and readme == table_rows((RESULTS / "tradeoff.md").read_text())


def test_quoted_sitting_speedups_are_the_stored_sittings():
    sitting = (RESULTS / "timing_interleaved.md").read_text()
    stored = [re.search(rf"^\| {depth} \|.*\| ([\d.]+× \[[\d.]+, [\d.]+\]) \|$", sitting, flags=re.M).group(1)
              for depth in (2, 4, 6)]
    for text in ((ROOT / "README.md").read_text(), (RESULTS / "README.md").read_text()):
        flat = " ".join(text.split())
        assert all(speedup in flat for speedup in stored), stored


def test_the_cpu_step_times_quoted_are_the_stored_ones():
    rows = json.loads((RESULTS / "step_times_cpu.json").read_text())["step_times"]
    by = {(row["depth"], row["runs"] if row["engine"] != "eager" else 0): row for row in rows}
    eager = {depth: by[(depth, 0)]["rounds_ms"] for depth in (0, 3)}

    def below_one(depth: int, runs: int) -> int:
        return sum(mine < theirs for mine, theirs in zip(by[(depth, runs)]["rounds_ms"], eager[depth]))

    spread = [value / statistics.median(row["rounds_ms"]) - 1 for row in rows for value in row["rounds_ms"]]
    rounds = len(eager[0])
    paragraph = " ".join((ROOT / "README.md").read_text().split("On this project's 2-core CPU stacking")[1]
                         .split("one run at a\ntime")[0].split())
    ratio = "{:.2f}×".format
    assert f"{rounds} interleaved rounds" in paragraph
    assert (f"N = 2 / 4 runs took {ratio(by[(3, 2)]['vs_eager'])} / {ratio(by[(3, 4)]['vs_eager'])} the eager time "
            f"per run-step at depth 3 (below 1 in {below_one(3, 2)} and {below_one(3, 4)} of the {rounds} rounds)"
            ) in paragraph
    assert (f"{ratio(by[(0, 2)]['vs_eager'])} / {ratio(by[(0, 4)]['vs_eager'])} at depth 0 (below 1 in "
            f"{below_one(0, 2)} and {below_one(0, 4)} of {rounds}") in paragraph
    assert f"one run stacked took {ratio(by[(0, 1)]['vs_eager'])} / {ratio(by[(3, 1)]['vs_eager'])}" in paragraph
    assert f"from {round(-100 * min(spread))} % below to {round(100 * max(spread))} % above" in paragraph


def test_the_quoted_search_and_study_counts_are_the_stored_ones():
    import pandas as pd
    text = " ".join((RESULTS / "README.md").read_text().split())
    first, second = (pd.read_csv(RESULTS / f"search-2000/{mode}/runs.csv").sort_values("number")
                     for mode in ("no-prune", "prune-quiet"))
    fields = ["freeze_depth", "scheduler", "epochs", "learning_rate", "accuracy"]
    same = (first[fields].to_numpy() == second[fields].to_numpy()).all(axis=1)
    leading = len(same) if same.all() else int(same.argmin())
    assert f"the first {leading} trials of both searches proposed the same configs" in text
    runs = pd.read_csv(RESULTS / "runs.csv")
    search = runs[runs.study == "search"]
    assert (f"20 trials with {search.train_seconds.sum():,.0f} s of training in all: "
            f"{(search.state == 'COMPLETE').sum()} complete") in text
    assert f"The study holds {(runs.study == 'tuned').sum()}:" in text


def test_the_first_run_quoted_is_the_stored_one():
    """README's "First run" paragraph quotes `bash results/reproduce.sh first-run`'s record and wall time."""
    record = json.loads((RESULTS / "first-run/run.json").read_text())
    command = json.loads((RESULTS / "first-run/command.json").read_text())
    timing = record["timing"]
    timed = timing["warmup_seconds"] + sum(timing["repeat_seconds"]) * timing["steps_per_repeat"]
    paragraph = " ".join((ROOT / "README.md").read_text().split("On 2 CPU cores this first run")[1]
                         .split("- `--model`")[0].split())
    assert f"{command['wall_s']:.1f} s from the command to its exit" in paragraph
    assert command["cpu"].startswith("Intel(R) Xeon") and "Intel Xeon" in paragraph
    assert f"Of the record's {record['wall_seconds']:.1f} s" in paragraph
    assert f"{timed:.0f} s time its steps alone ({timing['warmup_seconds']:.0f} s of them the " \
           f"{timing['warmup_steps']} warm-up steps)" in paragraph
    assert f"{record['train_loop_seconds']:.1f} s train the {timing['steps']} steps" in paragraph
    assert f"{record['eval_seconds']:.1f} s evaluate" in paragraph
    assert f"`train_seconds` counts the steps alone ({record['train_seconds']:.1f} s)" in paragraph
    assert record["precision"] == "bf16" and "bf16 autocast" in paragraph


def test_the_dev_split_cost_quoted_is_the_first_runs():
    """`--dev-size`'s cost is read off the first run's record: its evaluation of dev and validation, per row."""
    record = json.loads((RESULTS / "first-run/run.json").read_text())
    per_row = record["eval_seconds"] / (record["dev_samples"] + len(record["validation_labels"]))
    loop = record["train_loop_seconds"]
    text = " ".join((ROOT / "README.md").read_text().split())
    assert (f"evaluated dev's {record['dev_samples']:,} and validation's {len(record['validation_labels'])} rows in "
            f"{record['eval_seconds']:.1f} s against {loop:.1f} s of training, so the dev rows cost ≈ "
            f"{per_row * record['dev_samples']:.1f} s, {100 * per_row * record['dev_samples'] / loop:.0f} % of its "
            f"epoch") in text
    assert f"(6,735) would cost {100 * per_row * 6735 / loop:.0f} % of such an epoch" in text


def timing_table(name: str) -> list[dict]:
    """The rows of a `results/timing/` table (`ablations.timing_check`'s): depth, A's and B's times, B / A, ..."""
    rows = []
    for line in (RESULTS / "timing" / name).read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) in (8, 12) and cells[0].isdigit():  # 12: with the load columns (A's, B's foreign, ...)
            load = [float(c) if c not in ("—", "") else None for c in cells[8:11]] if len(cells) == 12 else [None] * 3
            rows.append({"depth": int(cells[0]), "alone": cells[2], "ratio": float(cells[4]),
                         "contended": cells[5] == "yes", "loop": float(cells[6]), "a_foreign": load[0],
                         "b_foreign": load[1], "b_paused": load[2], "build": cells[11] if len(cells) == 12 else None})
    return rows


def timed_moments(name: str) -> tuple[datetime, datetime]:
    """When A and B of a `results/timing/` table were first timed (its first line)."""
    head = (RESULTS / "timing" / name).read_text().splitlines()[0]
    found = re.findall(r"(A|B) timed (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", head)
    return tuple(datetime.strptime(moment, "%Y-%m-%d %H:%M:%S") for _, moment in found)


def spread(values: list[float], digits: int = 1) -> str:
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}"


def percent_spread(ratios: list[float]) -> str:
    return f"{round(100 * (min(ratios) - 1))}–{round(100 * (max(ratios) - 1))} %"


def test_the_timing_demo_figures_are_the_stored_tables():
    """README's show.sh paragraph: every ratio, time, load and interval it quotes is read back from
    results/timing/*.md."""
    paragraph = " ".join((ROOT / "README.md").read_text().split("Shown on this project's 2-core CPU")[1]
                         .split("Compare times within one study")[0].split())
    hog, workers = timing_table("show.md"), timing_table("show-workers.md")
    again, before = timing_table("show-again.md"), timing_table("show-workers-before-lease.md")

    def alone_times(rows):
        return [next(row["alone"] for row in rows if row["depth"] == depth) for depth in (0, 3, 6)]
    first = alone_times(hog)
    assert alone_times(workers) == alone_times(again) == first  # one alone run, A of every table
    seconds = [time.replace(" [", " s [") for time in first]  # "17.2 [13.9, 20.5]" -> "17.2 s [13.9, 20.5]"
    assert f"alone, the solo costs were {seconds[0]}, {seconds[1]} and {seconds[2]}" in paragraph
    assert f"other processes kept {max(r['a_foreign'] for r in hog):.2f} cores busy during every timing" in paragraph
    assert all(row["contended"] for row in hog) and "every timing was marked `contended`" in paragraph
    assert f"other processes kept {spread([r['b_foreign'] for r in hog], 2)} of 2 cores busy" in paragraph
    assert f"its solo estimate {spread([r['ratio'] for r in hog])}× the quiet one" in paragraph
    assert f"the loops themselves ran {spread([r['loop'] for r in hog])}× slower" in paragraph
    quiet = [r for r in workers if not r["contended"]]
    marked = [r for r in workers if r["contended"]]
    assert (f"{len(quiet)} of {len(workers)} times within {percent_spread([r['ratio'] for r in quiet])} of alone "
            "and unmarked") in paragraph
    assert f"kept out of every step timing ({max(r['b_foreign'] for r in workers):.2f} cores)" in paragraph
    assert f"took {spread([r['loop'] for r in workers])}× longer" in paragraph
    assert all(r["build"].endswith("⚠") for r in marked) and len({r["build"] for r in marked}) == 1
    assert f"{len(marked)} marked contended, their frozen-prefix builds having met " \
           f"{marked[0]['build'].split()[0]} cores" in paragraph
    by_depth = {depth: [r["ratio"] for r in before if r["depth"] == depth] for depth in (3, 6)}
    assert (f"put depth 3 at {spread(by_depth[3], 2)}× and depth 6 at {spread(by_depth[6], 2)}× its time alone"
            ) in paragraph and not any(row["contended"] for row in before)
    alone_at, again_at = timed_moments("show-again.md")
    assert f"the grid alone again {round((again_at - alone_at).total_seconds() / 60)} minutes later" in paragraph
    assert f"came out {percent_spread([r['ratio'] for r in again])} slower" in paragraph
    assert f"its loops {percent_spread([2 - r['loop'] for r in again])} faster" in paragraph


def stored_trials(study: str) -> list:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study, storage=f"sqlite:///{RESULTS / 'sst2.db'}").get_trials(deepcopy=False)


def record_of(trial) -> dict:
    record = trial.user_attrs["record"]
    return json.loads(record) if isinstance(record, str) else record


def test_the_full_cpu_grid_and_search_spans_are_the_stored_ones():
    """Section 3b's and 8's wall time and memory, 5's span: read off sst2.db (claims, records, trial times)."""
    text = " ".join((RESULTS / "README.md").read_text().split())
    runs = [(float(trial.user_attrs["claimed_at"]), record_of(trial)) for trial in stored_trials("grid-full")]
    span = max(claimed + record["wall_seconds"] for claimed, record in runs) - min(claimed for claimed, _ in runs)
    minutes, seconds = divmod(round(span), 60)
    assert f"**{minutes} min {seconds} s from the first run's claim to the last run's end" in text
    assert (f"the {span:,.0f} s from the first claim to the last run's end (the trials' `claimed_at` and the "
            f"records' `wall_seconds`) are {sum(r['wall_seconds'] for _, r in runs):,.0f} s of runs") in text
    assert f"against {sum(r['train_seconds'] for _, r in runs):,.0f} s of summed train seconds" in text
    peaks = {}
    for _, record in runs:  # one process: each record's max RSS is the process's so far
        assert record["peak_memory_scope"] == "process (max RSS)"
        depth = record["config"]["freeze_depth"]
        peaks[depth] = max(peaks.get(depth, 0), record["peak_memory_mb"])
    peak = max(peaks.values())
    assert f"peak RSS {peak / 1024:.1f} GiB** ({peak:,.1f} MiB, the records' `peak_memory_mb`" in text
    assert f"**peak RSS {peak / 1024:.1f} GiB** ({peak:,.1f} MiB), under the 8 GB" in text
    assert f"{peaks[0] / 1024:.2f} GiB through depth 0" in text
    assert "(" + ", ".join(f"{peaks[depth] / 1024:.2f}" for depth in range(1, 7)) + " GiB at depths 1–6" in text
    trials = stored_trials("search")
    search_span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    assert f"**{search_span:.0f} s from the first trial's start to the last trial's end**" in text


def test_the_smaller_searches_quoted_are_their_stored_outputs():
    """Section 5b's table: training seconds, front size, best accuracy per search, from search-2000/*/."""
    import pandas as pd
    text = (RESULTS / "README.md").read_text()
    for mode, label in (("no-prune", "| `--no-prune` |"), ("prune-quiet", "| `--prune`, idle machine |")):
        runs = pd.read_csv(RESULTS / f"search-2000/{mode}/runs.csv")
        front = pd.read_csv(RESULTS / f"search-2000/{mode}/pareto.csv")
        row = next(line for line in text.splitlines() if line.startswith(label))
        trained = (runs.state == "COMPLETE").sum()
        assert (f"{label} {trained} / {(runs.state == 'PRUNED').sum()} | {runs.train_seconds.sum():.0f} | "
                f"{len(front)} | {100 * runs.accuracy.max():.1f} % |") in row


def test_the_benchmark_history_is_the_stored_jsons():
    """Section 6: each session's totals come from the benchmark's JSON as that session committed it."""
    text = " ".join((RESULTS / "README.md").read_text().split())
    history = {path.stem: json.loads(path.read_text())["total_wall_seconds"]
               for path in (RESULTS / "benchmark_cpu_history").glob("*.json")}
    latest = json.loads((RESULTS / "benchmark_cpu.json").read_text())["total_wall_seconds"]

    def row(*commits: str) -> str:
        totals = [history[commit] for commit in commits]
        project, reference = ([total[key] for total in totals] for key in ("project", "reference"))
        ratios = [total["reference"] / total["project"] for total in totals]
        return (f"| {' – '.join(dict.fromkeys(f'{v:.1f}' for v in (min(project), max(project))))} s | "
                f"{' – '.join(dict.fromkeys(f'{v:.1f}' for v in (min(reference), max(reference))))} s | "
                f"{' – '.join(dict.fromkeys(f'{v:.2f}' for v in (min(ratios), max(ratios))))}× | "
                + ", ".join(f"`{commit}.json`" for commit in commits) + " |").replace(" – ", "–")
    assert row("0c3544e") in text and row("660a8a7", "0cedba4") in text
    assert (f"| {latest['project']:.1f} s | {latest['reference']:.1f} s | "
            f"{latest['reference'] / latest['project']:.2f}× | `benchmark_cpu.json` |") in text
    references = [total["reference"] for total in history.values()] + [latest["reference"]]
    assert (f"the reference's total ranged {min(references):.1f}–{max(references):.1f} s over {WORDS[len(references)]} "
            f"invocations ({min(references) / latest['project']:.2f}–{max(references) / latest['project']:.2f}× "
            f"at {latest['project']:.1f} s)") in text


def test_the_cpu_settings_quoted_are_the_stored_measurement():
    """README's host-memory and fused-AdamW figures, and core/host_memory.py's, are `reproduce.sh cpu-settings`'s."""
    import core.host_memory
    data = json.loads((RESULTS / "cpu_settings.json").read_text())
    faults, adamw = data["page_faults"], data["adamw"]
    readme = " ".join((ROOT / "README.md").read_text().split("**Host memory reused on the CPU.**")[1]
                      .split("; evaluation under")[0].split())
    docstring = " ".join(core.host_memory.__doc__.split())
    per_step = faults["minor_faults_per_step"]
    system = {name: faults["system_ms_per_step_rounds"][name] for name in ("default", "reuse")}
    wall = faults["reuse_vs_default_ms_per_step"]
    assert f"{data['rounds']} alternating rounds" in readme
    assert f"{faults['steps']} steps after {faults['warmup']} warm-up ones" in readme
    assert faults["precision"] == "bf16" and faults["batch_size"] == 16 and faults["length"] == 32
    assert f"{per_step['default']:,} → {per_step['reuse']:,} minor page faults a step" in readme
    assert f"{per_step['default']:,} -> {per_step['reuse']:,} minor page faults a step" in docstring
    medians = [f"{statistics.median(system[name]):.1f}" for name in ("default", "reuse")]
    assert f"(system CPU time) {medians[0]} → {medians[1]} ms a step" in readme
    assert f"{medians[0]} -> {medians[1]} ms (medians of {data['rounds']} rounds)" in docstring
    assert (f"rounds {spread(system['default'])} → {spread(system['reuse'])} ms") in readme
    assert (f"{wall['median']:.2f}× the default's (median of the rounds' ratios, rounds {wall['low']:.2f}–"
            f"{wall['high']:.2f}×)") in readme
    assert f"{wall['median']:.2f}x the default's (rounds {wall['low']:.2f}-{wall['high']:.2f}x)" in docstring
    assert data["device_name"].startswith("cpu (Intel(R) Xeon") and "2-core Xeon" in readme
    ratios = adamw["vs_fused"]
    assert (f"of MiniLM's {adamw['parameters']:,} parameters takes {ratios['per-tensor']['median']:.2f}× the fused "
            f"one's time and the multi-tensor one (`foreach=True`) {ratios['foreach']['median']:.2f}× (median of "
            f"{data['rounds']} interleaved rounds, {ratios['per-tensor']['low']:.2f}–{ratios['per-tensor']['high']:.2f}"
            f"× and {ratios['foreach']['low']:.2f}–{ratios['foreach']['high']:.2f}×; fused "
            f"{adamw['ms_per_step']['fused']:.1f} ms") in readme
