"""What every console script shares: the argument parser whose errors are one line, the exit
statuses, and `_run`, which turns a user's mistake into `error: ...` on stderr with exit status 2,
a failed parity check into exit status 1, and Ctrl-C / SIGTERM into a clean exit 130. A
traceback means a bug in this program."""

from __future__ import annotations

import argparse
import sys

from eclipse_export.util.errors import UserError

EXIT_USAGE, EXIT_PARITY, EXIT_INTERRUPTED = 2, 1, 130




class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` shows every option's default, once: appended where the help text does not
    already state it (argparse's ArgumentDefaultsHelpFormatter would repeat it), and not for
    flags, unset options or positionals."""

    def _fill_text(self, text, width, indent):
        # a description or epilog with line breaks is laid out already (lists of subcommands, targets)
        if "\n" in text:
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, (argparse._VersionAction, argparse._HelpAction))):
            return text
        if isinstance(default, (list, tuple)):
            default = ", ".join(map(str, default))
        return f"{text} (default: {default})".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own errors (bad int, unknown choice, missing flag) become UserError, so every
    user mistake ends the same way: one `error:` line and exit status 2 (argparse would print
    the usage block first). Every tool answers `--version` and shows its defaults in `--help`."""

    def __init__(self, *args, **kwargs):
        from eclipse_export import __version__

        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"{self.prog.split()[0]} {__version__}")

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
    # one by one: sources needs torch, the others do not, and a device without torch still
    # reports a failed engine build (ExportError) as one line
    for module, name in (("eclipse_export.export.exporter", "ExportError"),
                         ("eclipse_export.export.sources", "SourceError"),
                         ("eclipse_export.export.tokenizer_files", "TokenizerFilesError")):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
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
