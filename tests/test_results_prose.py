"""The numbers the READMEs quote from results/ are the stored ones: every generated report folder is rewritten by
`bash results/reproduce.sh report`, and the figures quoted by hand (the headline table, the sitting's speed-ups,
the CPU step times) are read back from the files they come from. Reads committed files only: no training."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


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


def spread(values: list[float], digits: int = 1) -> str:
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}"


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
    assert f"the rounds' ratio ran from {wall['low']:.2f}× to {wall['high']:.2f}×" in readme
    assert data["device_name"].startswith("cpu (Intel(R) Xeon") and "2-core Xeon" in readme
    ratios = adamw["vs_fused"]
    assert (f"of MiniLM's {adamw['parameters']:,} parameters takes {ratios['per-tensor']['median']:.2f}× the fused "
            f"one's time and the multi-tensor one (`foreach=True`) {ratios['foreach']['median']:.2f}× (median of "
            f"{data['rounds']} interleaved rounds, {ratios['per-tensor']['low']:.2f}–{ratios['per-tensor']['high']:.2f}"
            f"× and {ratios['foreach']['low']:.2f}–{ratios['foreach']['high']:.2f}×; fused "
            f"{adamw['ms_per_step']['fused']:.1f} ms") in readme
