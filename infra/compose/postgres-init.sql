-- Runs once, when the postgres volume is empty: MLflow gets its own role and database (Airflow's and
-- MLflow's schemas both have an alembic_version table, so they cannot share one database).
CREATE ROLE mlflow WITH LOGIN PASSWORD 'mlflow';
CREATE DATABASE mlflow OWNER mlflow;
