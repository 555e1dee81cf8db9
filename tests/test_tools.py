"""The small commands around the grid: the per-depth learning-rate choice and the Trainer benchmark."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ablations.lr_choice import best_rates

ROOT = Path(__file__).resolve().parents[1]


def sweep_run(depth: int, rate: float, accuracy: float, state: str = "COMPLETE") -> dict:
    record = {"config": {"freeze_depth": depth, "learning_rate": rate}, "accuracy": accuracy}
    return {"state": state, "record": record if state == "COMPLETE" else None}


def test_the_best_learning_rate_is_chosen_per_depth_by_mean_accuracy():
    runs = [sweep_run(0, 1e-4, 0.80), sweep_run(0, 1e-4, 0.82), sweep_run(0, 3e-4, 0.83), sweep_run(0, 3e-4, 0.77),
            sweep_run(6, 1e-4, 0.55), sweep_run(6, 1e-3, 0.70), sweep_run(6, 3e-3, 0.99, state="FAIL")]
    best = best_rates(runs)
    assert best[0] == (1e-4, 0.81, 2)
    assert best[6] == (1e-3, 0.70, 1)


def test_a_tie_in_dev_accuracy_goes_to_the_smaller_rate():
    """The documented rule (README: A fixed learning rate per depth), by which results/lr_choice.txt was made:
    the smaller rate, whatever the losses (the grid's --learning-rates differs: dev loss first)."""
    def run(rate, loss):
        record = {"config": {"freeze_depth": 0, "learning_rate": rate}, "accuracy": 0.5, "dev_accuracy": 0.558,
                  "dev_loss": loss}
        return {"state": "COMPLETE", "record": record}
    assert best_rates([run(1e-3, 0.658), run(1e-4, 0.677)])[0] == (1e-4, 0.558, 1)


def test_the_benchmark_refuses_a_missing_recipe_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ablations.benchmark", "--model", str(tmp_path), "--dataset",
                           str(tmp_path), "--recipe", str(tmp_path / "nope.py")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "nope.py" in done.stderr


def test_the_benchmark_says_what_each_contenders_seconds_are_and_where_they_ran(tmp_path, monkeypatch):
    """train_seconds is Trainer.train() for the recipe (evaluation and checkpoints inside) and the steps timed alone
    for the project: one key, two quantities, and neither the card nor the precision was kept beside them."""
    import json

    from ablations import benchmark
    recipe = tmp_path / "recipe.py"
    recipe.write_text("import json, sys\nprint(json.dumps({'train_seconds': 3.0, 'accuracy': 0.8, "
                      "'device': 'NVIDIA H200' if '--tuned' in sys.argv else 'cpu'}))\n")
    record = {"accuracy": 0.81, "train_seconds": 1.5, "train_loop_seconds": 1.7, "eval_seconds": 0.4,
              "device": "NVIDIA H200", "precision": "bf16", "engine": "captured (1 run)", "history": []}
    monkeypatch.setattr(benchmark, "project_run", lambda *args: (9.0, {(0, "linear"): record}))
    out = tmp_path / "recipe.json"
    monkeypatch.setattr(sys, "argv", ["benchmark", "--model", str(tmp_path), "--dataset", str(tmp_path), "--recipe",
                                      str(recipe), "--freeze-depths", "0", "--schedulers", "linear",
                                      "--output", str(out)])
    assert benchmark.main() == 0
    result = json.loads(out.read_text())
    cell = result["cells"]["0-linear"]
    assert cell["project"] == {k: record[k] for k in ("accuracy", "train_seconds", "train_loop_seconds",
                                                       "eval_seconds", "device", "precision", "engine")}
    assert (cell["reference"]["device"], cell["reference"]["precision"]) == ("cpu", "fp32")
    assert (cell["tuned"]["device"], cell["tuned"]["precision"]) == ("NVIDIA H200", "bf16")
    meaning = result["seconds"]["train_seconds"]
    assert "Trainer.train()" in meaning and "timed alone" in meaning
    assert result["total_wall_seconds"]["project"] == 9.0
