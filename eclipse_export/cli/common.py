"""What every console script shares: the argument parser whose errors are one line, the exit
statuses, and `_run`, which turns a user's mistake into `error: ...` on stderr with exit status 2,
a failed parity check into exit status 1, and Ctrl-C / SIGTERM into a clean exit 130. A
traceback means a bug in this program."""

from __future__ import annotations

import argparse
import sys

from eclipse_export.util.errors import UserError

EXIT_USAGE, EXIT_PARITY, EXIT_INTERRUPTED = 2, 1, 130




class ArgumentParser(argparse.ArgumentParser):
    """argparse's own errors (bad int, unknown choice, missing flag) become UserError, so every
    user mistake ends the same way: one `error:` line and exit status 2 (argparse would print
    the usage block first)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe a user's mistake or environment, not a bug."""
    from eclipse_export.runtime.backends.base import BackendError
    from eclipse_export.runtime.bundle import BundleError
    from eclipse_export.runtime.pipeline import GenerationError
    from eclipse_export.runtime.schedulers import SchedulerConfigError

    types: list[type[BaseException]] = [UserError, BackendError, BundleError, GenerationError, SchedulerConfigError]
    try:  # export-time modules need torch; the edge runtime may not have it
        from eclipse_export.export.exporter import ExportError
        from eclipse_export.export.sources import SourceError
        from eclipse_export.export.tokenizer_files import TokenizerFilesError

        types += [ExportError, SourceError, TokenizerFilesError]
    except ImportError:
        pass
    return tuple(types)


def _run(main, argv) -> int:
    import signal

    def terminate(signum, frame):
        # a service manager's SIGTERM unwinds like Ctrl-C, so the cleanup handlers run and no
        # half-written bundle or partial results are left behind
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        return main(argv)
    except KeyboardInterrupt:
        _log("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:
        from eclipse_export.metrics.parity import ParityError

        if isinstance(e, ParityError):
            _log(f"parity check failed: {e}")
            return EXIT_PARITY
        if isinstance(e, _user_errors()):
            _log(f"error: {e}")
            return EXIT_USAGE
        raise
