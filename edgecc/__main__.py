"""``python -m edgecc`` runs the CLI.

A Ctrl-C or SIGTERM while the CLI's modules import (before :func:`edgecc.cli.main` installs its
handler) prints ``edgecc: interrupted`` and exits 130, with no traceback.
"""

import signal
import sys


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        from edgecc.cli import main

        code = main()
    except KeyboardInterrupt:
        sys.stderr.write("edgecc: interrupted\n")
        code = 130
    sys.exit(code)
