"""An MLflow store that is an SQLite file or a database: one line naming what is wrong and the fix.

A damaged or foreign ``mlflow.db`` is named before TensorFlow loads, and a database that refuses the
connection is named after one attempt, not after MLflow's two minutes of retries.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from charrnn.errors import UserError, first_line

SQLITE_HEADER = b"SQLite format 3\x00"


def fix_hint(from_env: bool | None = None) -> str:
    """The fix for a store that cannot be used: the variable where the user set one (``from_env``,
    else read now), else moving the default file aside."""
    if "MLFLOW_TRACKING_URI" in os.environ if from_env is None else from_env:
        return "fix or unset MLFLOW_TRACKING_URI"
    return "move the file aside (`mv mlflow.db mlflow.db.bad`) and rerun; a new store is created"


def check_sqlite_file(uri: str) -> None:
    """A damaged or foreign ``mlflow.db`` is named before TensorFlow loads."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(urllib.parse.unquote(uri[len("sqlite:///"):]))
    if path.is_dir():
        raise UserError(f"MLflow store {path} is a folder, not an SQLite file; {fix_hint()}")
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise UserError(f"MLflow store {path} is not an SQLite database; {fix_hint()}")
    if not path.parent.is_dir():
        raise UserError(f"MLflow store {path}: folder {path.parent} does not exist; {fix_hint()}")


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def check_database(uri: str) -> None:
    """One connection attempt to a database store: MLflow's own retries take two minutes and print
    a warning per attempt before the same error. A password never reaches the error line."""
    scheme = uri.split(":", 1)[0]
    if not scheme.split("+", 1)[0] in DATABASE_SCHEMES:
        return
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(uri)
    except Exception:  # noqa: BLE001 - a malformed URL: MLflow reports it below
        return
    shown = url.render_as_string(hide_password=True)
    try:
        connect_args = {"connect_timeout": 10} if url.get_backend_name() == "postgresql" else {}
        engine = sqlalchemy.create_engine(url, connect_args=connect_args)
    except ModuleNotFoundError as err:
        hint = ""
        if scheme == "postgresql":  # SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3
            hint = (" (`postgresql://` means psycopg 3 to SQLAlchemy: write `postgresql+psycopg2://`, the driver "
                    "of this package's `postgres` extra, or `pip install 'psycopg[binary]'`)")
        raise UserError(f"MLflow store {shown} cannot be used: database driver "
                        f"{err.name!r} is not installed{hint}; fix or unset MLFLOW_TRACKING_URI") from None
    except Exception:  # noqa: BLE001 - MLflow reports it below
        return
    try:
        with engine.connect():
            pass
    except Exception as err:  # noqa: BLE001 - refused, unknown role or database, bad password...
        cause = getattr(err, "orig", None) or err
        first = first_line(cause)
        raise UserError(f"MLflow store {shown} cannot be used ({type(cause).__name__}: {first[:200]}); "
                        "fix or unset MLFLOW_TRACKING_URI") from None
    finally:
        engine.dispose()
