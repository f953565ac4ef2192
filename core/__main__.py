"""CLI: python -m core <command>. Every error is one line on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import sys


def cmd_fetch_default(args: argparse.Namespace) -> int:
    from .models import default_model_dir

    print(default_model_dir())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core", description="PEFT Studio engine")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch-default", help="dequantise the packaged SmolLM2 once and cache it as safetensors")
    f.set_defaults(func=cmd_fetch_default)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
