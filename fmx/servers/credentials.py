"""The servers' secrets under ``$FMX_HOME/servers`` (each file 0600, created on first use, never on a command
line): ``passwords.json`` (the Airflow ``admin`` password), ``mlflow_auth.json`` (the MLflow ``admin`` user
and password), ``mlflow_auth.ini`` (MLflow's basic-auth config; its user store ``mlflow_auth.db``),
``secrets.json`` (Fernet key, JWT, API and MLflow Flask secrets); and `private_dirs`: ``servers/``,
``airflow/`` and ``mlartifacts/`` 0700, ``mlflow.db`` 0600.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from fmx.servers.config import AIRFLOW_USER, MLFLOW_USER, ServerConfig, ServerError


def _private_json(path: Path, make: Any) -> dict[str, str]:
    """Read a small JSON secret file, creating it (mode 0600) with `make()` on first use."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # created concurrently: read theirs
            return json.loads(path.read_text())
        with os.fdopen(fd, "w") as f:
            json.dump(make(), f)
    return json.loads(path.read_text())


def private_dirs(cfg: ServerConfig) -> None:
    """Make the folders with secrets or metadata 0700 and the MLflow SQLite store 0600 (created empty if
    missing: SQLite takes a 0-byte file as an empty database, and its journals inherit the mode)."""
    for path in (cfg.state_dir, cfg.state_dir / "logs", cfg.airflow_home, cfg.home / "mlartifacts"):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)
    if cfg.db is None:
        store = cfg.home / "mlflow.db"
        os.close(os.open(store, os.O_WRONLY | os.O_CREAT, 0o600))
        store.chmod(0o600)


def mlflow_auth_file(home: Path) -> Path:
    return home / "servers" / "mlflow_auth.json"


def mlflow_credentials(home: str | Path) -> dict[str, str]:
    """{"username", "password"} of the MLflow server's admin user (created by the first `up`)."""
    path = mlflow_auth_file(Path(home).absolute())
    if not path.exists():
        raise ServerError(f"no MLflow credentials at {path}: run `fmx up` first")
    return json.loads(path.read_text())


def mlflow_login(cfg: ServerConfig) -> dict[str, str]:
    """{"username", "password"} of the MLflow server's admin user, created (0600) on first use."""
    return _private_json(mlflow_auth_file(cfg.home),
                         lambda: {"username": MLFLOW_USER, "password": secrets.token_urlsafe(24)})


def mlflow_auth_config(cfg: ServerConfig) -> Path:
    """Write MLflow's basic-auth config (0600: it holds the admin password the first start creates the admin
    user with); its path. Users and permissions live in ``servers/mlflow_auth.db``."""
    creds = mlflow_login(cfg)
    path = cfg.state_dir / "mlflow_auth.ini"
    text = (
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"  # only the admin user exists; nobody else reads anything
        f"database_uri = sqlite:///{cfg.state_dir / 'mlflow_auth.db'}\n"
        f"admin_username = {creds['username']}\n"
        f"admin_password = {creds['password']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)
    return path


def password_file(home: Path) -> Path:
    return home / "servers" / "passwords.json"


def airflow_password(home: str | Path) -> str:
    """The `admin` password of the Airflow API (fixed per FMX_HOME, created by the first `up`)."""
    path = password_file(Path(home).absolute())
    if not path.exists():
        raise ServerError(f"no password file at {path}: run `fmx up` first")
    return json.loads(path.read_text())[AIRFLOW_USER]


def server_secrets(cfg: ServerConfig) -> dict[str, str]:
    """The Fernet key, JWT, API and MLflow Flask secrets (created on first use, with the Airflow password)."""
    from cryptography.fernet import Fernet

    _private_json(password_file(cfg.home), lambda: {AIRFLOW_USER: secrets.token_urlsafe(16)})
    return _private_json(
        cfg.state_dir / "secrets.json",
        lambda: {
            "fernet_key": Fernet.generate_key().decode(),
            "jwt_secret": secrets.token_urlsafe(64),  # HS512 wants >= 64 bytes
            "secret_key": secrets.token_urlsafe(32),
            "mlflow_secret_key": secrets.token_urlsafe(32),
        },
    )
