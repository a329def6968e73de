"""User-facing errors: one line naming the problem and the fix, a non-zero exit."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem the user can fix (bad input, bad params, missing files).

    The message is printed as one line, without a traceback.
    """


def exit_on_user_error(main):
    """Wrap a command's ``main`` so that a UserError prints one line and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            message = " ".join(str(err).split())
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
