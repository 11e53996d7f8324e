"""``medseg viewer``: options and entry point (light imports: the web stack loads only when it runs)."""

from __future__ import annotations

import argparse
import logging
import sys
from urllib.parse import urlparse

from medseg.errors import MedsegError

DEFAULT_PORT = 8090


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medseg viewer``."""
    parser.add_argument("--url", required=True, help="model server base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", required=True, help="model name on the model server")
    parser.add_argument("--host", default="127.0.0.1", help="address the viewer listens on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port of the viewer (default: {DEFAULT_PORT})")
    parser.add_argument("--channels", nargs="+", default=None,
                        help="channel names, one upload field each, in the model's order (default: the model's, from GET /v2/models/NAME)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the model server per case (default: 300)")
    parser.add_argument("--max-upload-mb", type=float, default=150.0, help="largest upload, all files together, in MiB (default: 150)")
    parser.add_argument("--max-results", type=int, default=8, help="results kept in memory, the oldest dropped first (default: 8)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="cases sent to the model server at once; more get 503 (default: 2)")


def config_from_args(args: argparse.Namespace):  # -> ViewerConfig (imported lazily)
    from medseg.viewer.app import ViewerConfig

    parsed = urlparse(args.url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise MedsegError(f"--url must be an http(s) URL such as http://127.0.0.1:8080, got {args.url!r}")
    for name in ("timeout", "max_upload_mb", "max_results", "max_concurrent"):
        if getattr(args, name) <= 0:
            raise MedsegError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.channels and len(set(args.channels)) != len(args.channels):
        raise MedsegError(f"--channels has duplicates: {args.channels}")
    return ViewerConfig(model_url=args.url.rstrip("/"), model_name=args.model, channels=tuple(args.channels) if args.channels else None,
                        timeout_s=float(args.timeout),
                        max_upload_bytes=int(args.max_upload_mb * 2**20), max_results=int(args.max_results), max_concurrent=int(args.max_concurrent))


def run(args: argparse.Namespace) -> int:
    """Run ``medseg viewer`` (blocks until interrupted)."""
    from medseg.viewer.app import serve

    serve(config_from_args(args), host=args.host, port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medseg.viewer", description="Web viewer: upload a case, see the answer of the model server (a segmentation, "
                                     "a slice's mask or the class probabilities), download it.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return run(args)
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
