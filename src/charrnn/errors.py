"""User-facing errors: one line naming the problem and the fix, a non-zero exit.

SIGTERM (``dvc queue kill``, a scheduler, ``kill``) is turned into an exception like Ctrl-C's, so a
stage stopped either way unwinds: temporary files are removed and the MLflow run is ended KILLED.
"""

from __future__ import annotations

import errno
import functools
import signal
import sys


class UserError(Exception):
    """A problem the user can fix (bad input, bad params, missing files).

    The message is printed as one line, without a traceback.
    """


def first_line(error: BaseException | str, default: str | None = None) -> str:
    """The first non-blank line of ``error``'s message (or of a text), stripped: what a one-line
    report quotes of a library's multi-line error. Without one, ``default``, else the exception's
    class name (for a text, "")."""
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), None)
    if line is not None:
        return line
    if default is not None:
        return default
    return type(error).__name__ if isinstance(error, BaseException) else ""


class Interrupted(KeyboardInterrupt):
    """The process received SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def exit_on_user_error(main):
    """Wrap a command's ``main`` so that a UserError prints one line and exits 2, and SIGINT or
    SIGTERM print one line and exit 128 + the signal number."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise_interrupted)
        try:
            return main(*args, **kwargs)
        except UserError as err:
            message = " ".join(str(err).split())
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(2)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Outputs are written to temporary names and renamed: the previous ones are intact.
            where = f" writing {err.filename}" if err.filename else ""
            print(f"error: no space left on the device{where}; free some space and rerun (the previous "
                  "outputs are intact)", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            name = signal.Signals(signum).name
            print(f"error: interrupted by {name}; rerun the same command (or `dvc repro`) to resume "
                  "from the last completed epoch", file=sys.stderr, flush=True)
            sys.exit(128 + signum)

    return wrapper
