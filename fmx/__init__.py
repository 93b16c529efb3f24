"""fmx: the orchestration layer over features/, fm/ and experts/ (which hold every stage function).

- cli/: the `fmx` command (one module per family of sub-commands, `run` included)
- dagkit: what the DAG files of dags/ share (Params, task defaults, the day of a run, the task grids)
- servers/: `fmx up/down/status`, the local Airflow and MLflow servers
- run/: `fmx run`'s engine, the real DAGs run in one process day by day
"""

import features  # noqa: F401  (first: it sets the data layer's allocator settings before polars loads)
