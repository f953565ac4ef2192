"""PEFT Studio: python app.py [--host 127.0.0.1] [--port 7860] [--data-dir studio_data] [--auth user:pass] [--share]
                            [--ssl-certfile cert.pem --ssl-keyfile key.pem]

Security defaults: the studio binds to 127.0.0.1. Any other address, and --share (a public gradio.live link),
are refused unless --auth (or the PEFT_STUDIO_AUTH environment variable) sets a user name and password. A
non-loopback bind without --ssl-certfile/--ssl-keyfile is allowed with --auth, but warns that the password (and
API tokens) travel in clear text.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import Any

from studio.paths import DEFAULT_DATA_DIR

AUTH_ENV = "PEFT_STUDIO_AUTH"


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like user:password (both non-empty)")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, share: bool, auth: tuple[str, str] | None) -> str | None:
    """Why this configuration is refused, or None when it is allowed."""
    if auth is not None:
        return None
    if not is_loopback(host):
        return (f"refusing to listen on {host}: anyone who can reach this address could read your data and start "
                f"jobs. Add --auth user:password (or set {AUTH_ENV}), or use --host 127.0.0.1.")
    if share:
        return (f"refusing --share without authentication: a public gradio.live link would let anyone on the "
                f"internet use this studio. Add --auth user:password (or set {AUTH_ENV}).")
    return None


def ssl_options(certfile: str | None, keyfile: str | None) -> dict[str, Any]:
    """launch()'s ssl_certfile/ssl_keyfile: both or neither, and both readable files; ValueError otherwise."""
    if not certfile and not keyfile:
        return {}
    if not certfile or not keyfile:
        raise ValueError("--ssl-certfile and --ssl-keyfile go together: give both, or neither")
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
    # ssl_verify=False: gradio checks its own startup over https://localhost, which a self-signed certificate
    # (the usual case on a private server) would fail; browsers and clients still verify as they choose
    return {"ssl_certfile": certfile, "ssl_keyfile": keyfile, "ssl_verify": False}


def clear_text_warning(host: str, tls: bool) -> str | None:
    """The warning for a bind others can reach without TLS, or None."""
    if tls or is_loopback(host):
        return None
    return (f"warning: listening on {host} over plain HTTP: the password and API tokens travel in clear text, "
            "readable by anyone on the network path. Add --ssl-certfile and --ssl-keyfile to serve HTTPS.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PEFT Studio: fine-tune language models in the browser.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --auth)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help=f"runs, uploads, exports and the registry (default {DEFAULT_DATA_DIR})")
    p.add_argument("--auth", default=None, help=f"user:password required on every page and API call (or env {AUTH_ENV})")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs --auth)")
    p.add_argument("--model", default="default", help="base model preselected in the UI (default: bundled SmolLM2-135M)")
    p.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM) to serve HTTPS; with --ssl-keyfile")
    p.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM) of --ssl-certfile")
    p.add_argument("--max-upload-mb", type=float, default=200, help="largest dataset upload accepted (default 200 MB)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        auth = parse_auth(args.auth or os.environ.get(AUTH_ENV))
        tls = ssl_options(args.ssl_certfile, args.ssl_keyfile)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    refusal = check_exposure(args.host, args.share, auth)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    warning = clear_text_warning(args.host, bool(tls))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from studio.context import StudioContext
    from studio.ui import build_app, launch_options

    ctx = StudioContext.create(args.data_dir, default_model=args.model,
                               max_upload_bytes=int(args.max_upload_mb * 2**20))
    demo = build_app(ctx)
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=args.host, server_port=args.port, share=args.share, **tls, **launch_options(ctx, auth)
        )
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
