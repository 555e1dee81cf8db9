"""`python -m ablations.lr_choice`: the best learning rate per freeze depth from a stored sweep.

The learning rate is a nuisance parameter: deeper freezing wants larger rates, so comparing depths at one
shared rate measures the rate, not the depth. Sweep rates per depth (a grid per rate into one study), then let
this print `depth lr score runs` lines that the next grid reads; the score is dev accuracy, or dev macro-F1 for a
sweep run with --select-by f1 (`ablations.tuning.choice_metric`).
"""
from __future__ import annotations

from collections import defaultdict

from ablations.runner import default_storage
from ablations.tuning import choice_value, record_metric, split_label
from core.cli import ArgumentParser, main_guard
from core.errors import UsageError


def sweep_metric(runs: list[dict]) -> str:
    """The one `choice_metric` of the sweep's completed runs. A study fed by several grid invocations can mix
    --select-by values; accuracy and macro-F1 do not average into one score, so such a sweep is refused."""
    found = sorted({record_metric(run["record"]) for run in runs if run["state"] == "COMPLETE" and run.get("record")})
    if len(found) > 1:
        raise UsageError("the sweep's runs chose by both dev accuracy and dev macro-F1 (--select-by f1 in some "
                         "grids only), which do not average into one score: sweep each --select-by in its own "
                         "--study-name")
    return found[0] if found else "accuracy"


def best_rates(runs: list[dict]) -> dict[int, tuple[float, float, int]]:
    """depth -> (learning rate with the best mean dev score over seeds/schedulers, that score, runs averaged): dev
    accuracy, or dev macro-F1 for a sweep that chose its epochs by it (`sweep_metric`); validation stands in for
    runs without a dev split. A tie goes to the smaller rate. (The grid's
    --learning-rates looks at dev loss first, `ablations.tuning.tie_rule`; this rule is kept because
    results/lr_choice.txt, which the stored studies ran at, came from it: depth 3 tied there.)"""
    metric = sweep_metric(runs)
    scores: dict[tuple[int, float], list[float]] = defaultdict(list)
    for run in runs:
        if run["state"] == "COMPLETE" and run.get("record"):
            config = run["record"]["config"]
            scores[(config["freeze_depth"], config["learning_rate"])].append(choice_value(run["record"], metric))
    best: dict[int, tuple[float, float, int]] = {}
    for (depth, rate), values in sorted(scores.items()):
        mean = sum(values) / len(values)
        if depth not in best or mean > best[depth][1]:
            best[depth] = (rate, mean, len(values))
    return best


def main() -> int:
    parser = ArgumentParser(prog="python -m ablations.lr_choice", description=__doc__.splitlines()[0])
    parser.add_argument("--study-name", default="lr-sweep", metavar="NAME",
                        help="the sweep's study (default: lr-sweep)")
    parser.add_argument("--storage", default=None, metavar="URL", help="Optuna storage URL holding the sweep "
                        f"(default: {default_storage()}, the grid's default ledger)")
    args = parser.parse_args()
    from ablations.storage import existing_storage, load_runs
    storage = existing_storage(args.storage or default_storage())
    runs = load_runs(storage, [args.study_name])
    best = best_rates(runs)
    if not best:
        raise UsageError(f"study {args.study_name!r} has no completed runs to choose a learning rate from")
    # validation's score where no run of the sweep had a dev split (--dev-size 0: choice_value reads validation)
    on_dev = any(run["record"].get("dev_accuracy") is not None for run in runs if run.get("record"))
    print(f"# depth learning_rate mean_{split_label(sweep_metric(runs), on_dev).replace(' ', '_')} runs")
    for depth, (rate, accuracy, count) in sorted(best.items()):
        print(f"{depth} {rate:g} {accuracy:.4f} {count}")
    return 0


if __name__ == "__main__":
    main_guard(main)
