"""python -m studio token create NAME | list | revoke ID  [--data-dir studio_data]

API tokens for scripts that call the studio's HTTP API (studio.api) with ``Authorization: Bearer ...``. The token
is printed once, at creation; the registry keeps only its sha256 (studio.tokens).
"""

from __future__ import annotations

import argparse
import sys
import time

from . import tokens
from .paths import DEFAULT_DATA_DIR
from .store import RunStore


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "never"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studio", description="PEFT Studio administration.")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help=f"the studio's data folder (default {DEFAULT_DATA_DIR})")
    sub = p.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("token", help="API tokens: create, list, revoke").add_subparsers(dest="action", required=True)
    tok.add_parser("create", help="create a token and print it (once)").add_argument("name", help="what it is for")
    tok.add_parser("list", help="list tokens (never their secrets)")
    tok.add_parser("revoke", help="revoke a token by id").add_argument("id", help="the token's id (from list)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = RunStore(args.data_dir)
    try:
        if args.action == "create":
            t = tokens.create(store, args.name)
            print(f"Created API token {t['id']} ({t['name']}). Copy it now; it is not shown again:\n{t['token']}")
        elif args.action == "list":
            rows = tokens.listing(store)
            if not rows:
                print("No API tokens; create one with: python -m studio token create NAME")
            for r in rows:
                state = f"revoked {_when(r['revoked'])}" if r["revoked"] else "valid"
                print(f"{r['id']}  {r['name']:<24}  created {_when(r['created'])}  last used {_when(r['last_used'])}"
                      f"  {state}")
        else:
            print(f"Revoked API token {args.id} ({tokens.revoke(store, args.id)}).")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
