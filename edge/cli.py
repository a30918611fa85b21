"""Command-line entry points: parse arguments, call the library, print. Nothing else.

`edge serve | check | status` (and, as their parts land, `stream FILE`, `diarize FILE`,
`model fetch`). Exit codes: 0 ok, 1 failure, 2 bad usage or an invalid setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from edge import __version__
from edge.settings import Settings, SettingsError, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge", description="Meeting-room speech appliance")
    parser.add_argument("--version", action="version", version=f"edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"edge: invalid setting {exc}", file=sys.stderr)
        return 2
    return args.run(settings, args)


# --- one block per command: `add_<name>` registers it, `_<name>` runs it ---

def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the daemon")
    p.set_defaults(run=_serve)


def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="print the daemon's status channel")
    _client_args(p)
    p.add_argument("--once", action="store_true", help="print the first snapshot and exit")
    p.set_defaults(run=lambda settings, args: asyncio.run(_status(settings, args)))


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="daemon address (default: ws://EDGE_HOST:EDGE_PORT)")
    p.add_argument("--key", help="API key (default: the first of EDGE_API_KEYS)")


def _client_target(settings: Settings, args: argparse.Namespace) -> tuple[str, str | None]:
    host = "127.0.0.1" if settings.edge_host in ("0.0.0.0", "::") else settings.edge_host
    scheme = "wss" if settings.edge_tls_cert else "ws"
    url = args.url or f"{scheme}://{host}:{settings.edge_port}"
    keys = settings.api_keys()
    return url.rstrip("/"), args.key or (keys[0] if keys else None)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from edge.app import run
    from edge.systemd import setup_logging

    setup_logging(settings.edge_log_level)
    return run(settings)


async def _status(settings: Settings, args: argparse.Namespace) -> int:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    url, key = _client_target(settings, args)
    headers = {"Authorization": f"Token {key}"} if key else None
    try:
        async with connect(url + "/v1/status", additional_headers=headers) as ws:
            async for message in ws:
                print(json.dumps(json.loads(message)), flush=True)
                if args.once:
                    return 0
    except InvalidStatus as exc:
        print(f"edge: {url} refused: HTTP {exc.response.status_code}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"edge: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    return 0


COMMANDS = [add_serve, add_status]

if __name__ == "__main__":
    sys.exit(main())
