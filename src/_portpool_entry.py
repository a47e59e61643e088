"""The ``portpool`` command's entry point, outside the package on purpose.

Importing ``portpool.cli`` takes tens of milliseconds, and a Ctrl-C in that time
used to print a KeyboardInterrupt traceback. Here, before any of it is imported,
SIGINT gets its default action: the process just ends, interrupted, with nothing to
release yet (``portpool.cli.main`` keeps it so; ``run``/``up`` take the signals over
while they hold something). Only the interpreter's built-in ``_signal`` is used:
even ``import signal`` loads enum and functools, time in which a Ctrl-C would raise.
"""

import _signal  # type: ignore[import-not-found]  # no stub: the C module behind signal
import gc


def main() -> None:
    """Console-script entry point: ``portpool.cli.main`` with a quiet early Ctrl-C."""
    if _signal.getsignal(_signal.SIGINT) is not _signal.SIG_IGN:  # `nohup`, `cmd &`
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    # What the imports create lives as long as the process: the cyclic collector need
    # not walk it while importing, nor once more at exit (11-14% of status and run in
    # benchmarks/bench_cli.py). The collector runs as usual in between.
    gc.disable()
    from portpool.cli import main as cli_main

    gc.freeze()
    gc.enable()
    try:
        cli_main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    main()
