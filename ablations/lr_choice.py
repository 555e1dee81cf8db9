"""`python -m ablations.lr_choice`: the best learning rate per freeze depth from a stored sweep.

The learning rate is a nuisance parameter: deeper freezing wants larger rates, so comparing depths at one
shared rate measures the rate, not the depth. Sweep rates per depth (a grid per rate into one study), then let
this print `depth lr accuracy` lines that the next grid reads.
"""
from __future__ import annotations

from collections import defaultdict

from ablations.runner import default_storage
from ablations.tuning import choice_accuracy
from core.cli import ArgumentParser, main_guard
from core.errors import UsageError


def best_rates(runs: list[dict]) -> dict[int, tuple[float, float, int]]:
    """depth -> (learning rate with the best mean dev accuracy over seeds/schedulers, that accuracy, runs averaged);
    validation accuracy stands in for runs without a dev split. A tie goes to the smaller rate. (The grid's
    --learning-rates looks at dev loss first, `ablations.tuning.TIE_RULE`; this rule is kept because
    results/lr_choice.txt, which the stored studies ran at, came from it: depth 3 tied there.)"""
    scores: dict[tuple[int, float], list[float]] = defaultdict(list)
    for run in runs:
        if run["state"] == "COMPLETE" and run.get("record"):
            config = run["record"]["config"]
            scores[(config["freeze_depth"], config["learning_rate"])].append(choice_accuracy(run["record"]))
    best: dict[int, tuple[float, float, int]] = {}
    for (depth, rate), accuracies in sorted(scores.items()):
        mean = sum(accuracies) / len(accuracies)
        if depth not in best or mean > best[depth][1]:
            best[depth] = (rate, mean, len(accuracies))
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
    best = best_rates(load_runs(storage, [args.study_name]))
    if not best:
        raise UsageError(f"study {args.study_name!r} has no completed runs to choose a learning rate from")
    print("# depth learning_rate mean_dev_accuracy runs")
    for depth, (rate, accuracy, count) in sorted(best.items()):
        print(f"{depth} {rate:g} {accuracy:.4f} {count}")
    return 0


if __name__ == "__main__":
    main_guard(main)
