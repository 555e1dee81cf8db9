"""Many runs: the grid, the search, the run ledger on an Optuna study, and the trade-off report."""
