"""`eclipse-serve --repository REPO`: run tritonserver on a repository written by
`eclipse-export --from-bundle B --target triton`, until Ctrl-C or SIGTERM (then SIGINT to the
server: its clean shutdown). `--docker` prints the `docker run` line for NVIDIA's container
instead. A thin adapter over serve/server.py."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from eclipse_export.cli.common import ArgumentParser, _log, _run
from eclipse_export.util.errors import UserError


def serve_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="eclipse-serve", description="Serve a Triton model repository made by eclipse-export --target triton.")
    p.add_argument("--repository", type=Path, required=True, help="the model repository")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--tritonserver", type=Path, help="a tritonserver binary (default: the nvidia-pytriton wheel's, else PATH)")
    p.add_argument("--python", type=Path,
                   help="interpreter whose environment the models run in (default: this one); the wheel's server needs numpy < 2 there")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the models to load (default 600)")
    p.add_argument("--docker", action="store_true", help="print the docker run line for NVIDIA's Triton container and exit")
    p.add_argument("--jetson", action="store_true", help="with --docker: the Jetson (-igpu) container")
    return p


def serve_main(argv=None) -> int:
    args = serve_parser().parse_args(argv)
    from eclipse_export.serve.server import ServerError, TritonServer, docker_command, find_tritonserver

    for name in ("http_port", "grpc_port", "metrics_port"):
        if not 1 <= getattr(args, name) <= 65535:
            raise UserError(f"--{name.replace('_', '-')} must be a port number 1..65535")
    if not (args.repository / "eclipse" / "config.pbtxt").is_file():
        raise UserError(f"{args.repository} is not a repository written by eclipse-export --target triton "
                        "(no eclipse/config.pbtxt)")
    if args.docker:
        print(shlex.join(docker_command(args.repository, args.http_port, args.grpc_port, args.metrics_port, args.jetson)))
        return 0
    try:
        install = find_tritonserver(args.tritonserver) if args.tritonserver else None
        server = TritonServer(args.repository, install=install, host=args.host, http_port=args.http_port,
                              grpc_port=args.grpc_port, metrics_port=args.metrics_port, log=sys.stderr,
                              python=args.python)
    except ServerError as e:
        raise UserError(str(e)) from None
    _log(f"starting tritonserver ({server.install.origin}: {server.install.binary}) on {args.repository}")
    stop = threading.Event()
    # Ctrl-C and SIGTERM (_run turns it into KeyboardInterrupt) both end in server.stop()
    try:
        try:
            server.start(args.ready_timeout)
        except ServerError as e:
            raise UserError(str(e)) from None
        _log(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url} (Ctrl-C stops)")
        while not stop.wait(1.0):
            if server.process.poll() is not None:
                raise UserError(f"tritonserver exited with status {server.process.returncode}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean stop short
        status = server.stop()
        if server.process is not None:
            _log(f"tritonserver stopped (status {status})"
                 + (f"; removed {len(server.removed_shm)} shared-memory region(s) it left" if server.removed_shm else ""))
    return 0


def entry() -> None:
    sys.exit(_run(serve_main, None))


if __name__ == "__main__":  # python -m eclipse_export.cli.serve
    entry()
