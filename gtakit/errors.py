"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class GtakitError(ValueError):
    """Bad input or an unsupported request; the message says what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C so that every cleanup runs (gtakit.io.output)."""


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """What the user can act on ends in one line on stderr (exit 2; 130/143 when interrupted/terminated), never a
    traceback. Outputs are staged, so an interruption leaves nothing half-written (gtakit.io.output)."""
    try:
        yield
    except GtakitError as err:
        _exit(f"error: {err}", 2)
    except Terminated as err:
        _exit(f"stopped: {err}; no partial output was left", 143)
    except KeyboardInterrupt as err:  # its message, if any, says what was kept (finetune's checkpoints)
        _exit(f"interrupted; no partial output was left{f'; {err}' if str(err) else ''}", 130)
    except OSError as err:  # a file system the checks could not foresee (e.g. a disk filling up while reading)
        where = f" ({err.filename})" if err.filename else ""
        _exit(f"error: {err.strerror or err}{where}", 2)


def _exit(message: str, code: int) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(code) from None
