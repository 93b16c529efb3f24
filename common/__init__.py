"""What every layer shares, below `features/`: metrics, weight EMA, torch thread scoping, MLflow conventions
(tracking, lineage runs), strict JSON values (jsonsafe) and `fmx_home()`. Imports nothing of fmx's own
packages; importing the package loads nothing heavy (each module imports what it needs: numpy for metrics,
torch for ema/threads, mlflow for tracking)."""
