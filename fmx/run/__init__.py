"""`fmx run`'s engine: the real DAGs of dags/ run in this process, day by day (its command: fmx.cli.run).

- runner: the job (`run_job(JobConfig) -> JobReport`): which DAG runs, in which order, with which conf
- airflow_setup: Airflow's isolated set-up for the job (environment, metadata DB from a migrated template,
  training pool, DAGS_FOLDER)
- inprocess: `DagRunner`, the scheduling loop and the forkserver pool of workers that run task instances
- preload, preloaded: what a process about to run fmx tasks imports once, ahead of them
"""
