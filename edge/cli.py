"""Command-line entry points: parse arguments, call the library, print. Nothing else.

    edge serve                      run the daemon
    edge check [--json] [--deep]    check this device (edge/checks.py)
    edge status [--once]            print a running daemon's status channel
    edge stream FILE                stream a WAV/FLAC file to a running daemon (edge/client.py)
    edge model fetch | export       get, unpack and load the model; export it to ONNX
    edge diarize FILE               run the live diarizer over a file
    edge eval                       score diarization (RTTM vs RTTM, the engine or a daemon)

This module holds the daemon's commands and what the client commands share (`client_args`,
`client_target`); the diarization tools (model, diarize, eval) are in `edge.cli_diarization`.
Exit codes: 0 ok, 1 failure, 2 bad usage or an invalid setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edge import __version__
from edge.settings import Settings, SettingsError, load_settings, resolve_env_file

Register = Callable[[argparse._SubParsersAction], None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `edge` command line (`argv`, default `sys.argv[1:]`); returns the exit code."""
    parser = argparse.ArgumentParser(prog="edge", description="Meeting-room speech appliance")
    parser.add_argument("--version", action="version", version=f"edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in commands():
        register(sub)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"edge: invalid setting {exc}", file=sys.stderr)
        return 2
    try:
        return args.run(settings, args)
    except UsageError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 2


class UsageError(Exception):
    """A bad command line or option value (exit 2); `str()` is the one line shown."""


# --- one block per command: `add_<name>` registers it, `_<name>` runs it ---

def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the daemon")
    p.set_defaults(run=_serve)


def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="print the daemon's status channel")
    client_args(p)
    p.add_argument("--once", action="store_true", help="print the first snapshot and exit")
    p.set_defaults(run=lambda settings, args: asyncio.run(_status(settings, args)))


def add_stream(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stream", help="stream a WAV/FLAC file to a running daemon")
    p.add_argument("file", type=Path)
    client_args(p)
    p.add_argument("--fast", action="store_true", help="send as fast as the daemon accepts")
    p.add_argument("--speed", type=float, default=1.0,
                   help="pace at this multiple of real time (default 1)")
    p.add_argument("--frame-ms", type=int, default=100, help="audio per frame (default 100)")
    p.add_argument("--language", help="BCP-47 code or auto (default: the daemon's)")
    p.add_argument("--model", help="upstream model (default: the daemon's)")
    p.add_argument("--interim", action="store_true", help="ask for interim results")
    p.add_argument("--turns", action="store_true", help="ask for SpeakerTurn messages")
    p.add_argument("--jsonl", type=Path, help="write every message received as JSON lines")
    p.add_argument("--rttm", type=Path, help="write the speaker segments as RTTM")
    p.set_defaults(run=lambda settings, args: asyncio.run(_stream(settings, args)))


def add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check", help="check this device: platform, cache, model, export, NeMo, Google, port, unit"
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    p.add_argument("--deep", action="store_true", help="import NeMo for real (seconds)")
    p.set_defaults(run=_check)


CLIENT_KEY_ENV = "EDGE_API_KEY"  # the key `edge status/stream` send (a client's, not a setting)


def client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="daemon address (default: ws://EDGE_HOST:EDGE_PORT)")
    p.add_argument("--key-file", type=Path,
                   help=f"read the API key from this file (first line; default: ${CLIENT_KEY_ENV}, "
                        "else the first of the daemon's EDGE_API_KEYS)")
    p.add_argument("--key", help="API key on the command line: visible to every local user "
                                 f"(ps, /proc) and kept in shell history; prefer ${CLIENT_KEY_ENV} "
                                 "or --key-file")


def client_url(settings: Settings, args: argparse.Namespace | None = None) -> str:
    host = "127.0.0.1" if settings.edge_host in ("0.0.0.0", "::") else settings.edge_host
    scheme = "wss" if settings.edge_tls_cert else "ws"
    url = (args.url if args is not None else None) or f"{scheme}://{host}:{settings.edge_port}"
    return url.rstrip("/")


def client_key(settings: Settings, args: argparse.Namespace) -> str | None:
    """The key to send: `--key` (warned about) > `--key-file` > $EDGE_API_KEY > the first of
    the daemon's own keys, admin keys first (an operator on the device). Raises `UsageError` for an unreadable
    or empty key file."""
    if args.key:
        print(f"edge: warning: --key shows the key to every local user (ps, /proc) and in shell "
              f"history; use ${CLIENT_KEY_ENV} or --key-file", file=sys.stderr)
        return str(args.key)
    if args.key_file is not None:
        try:
            text = args.key_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--key-file {args.key_file}: {getattr(exc, 'strerror', None) or exc}") from exc
        lines = [x.strip() for x in text.splitlines() if x.strip() and not x.lstrip().startswith("#")]
        if not lines:
            raise UsageError(f"--key-file {args.key_file}: no key in it (one key on the first line)")
        return lines[0]
    if os.environ.get(CLIENT_KEY_ENV):
        return os.environ[CLIENT_KEY_ENV]
    keys = settings.admin_keys() + settings.api_keys()  # an operator's tools see details
    return keys[0] if keys else None


def client_target(settings: Settings, args: argparse.Namespace) -> tuple[str, str | None]:
    return client_url(settings, args), client_key(settings, args)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from edge.app import run
    from edge.systemd import setup_logging

    setup_logging(settings.edge_log_level)
    return run(settings)


def _check(settings: Settings, args: argparse.Namespace) -> int:
    from dotenv import dotenv_values

    from edge.checks import failed, render, render_json, run_checks

    env_file = resolve_env_file(os.environ)
    # What the daemon's environment holds: the env file's values under the process's own
    # (Google's variables are not settings, so only the file and the environment have them).
    file_values = {k: v for k, v in dotenv_values(env_file).items() if v} if env_file else {}
    url = client_url(settings)
    checks = run_checks(settings, env_file=env_file, environ={**file_values, **os.environ},
                        daemon_url=url, deep=args.deep)
    print(render_json(checks) if args.json else render(checks))
    return 1 if failed(checks) else 0


async def _status(settings: Settings, args: argparse.Namespace) -> int:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    url, key = client_target(settings, args)
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


async def _stream(settings: Settings, args: argparse.Namespace) -> int:
    from websockets.exceptions import InvalidStatus

    from edge import client

    url, key = client_target(settings, args)
    try:
        samples, rate = client.read_audio(args.file)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"edge: cannot read {args.file}: {exc}", file=sys.stderr)
        return 1
    query: dict[str, object] = {"diarize": True, "interim_results": args.interim}
    if args.turns:
        query["speaker_turns"] = True
    for name in ("language", "model"):
        if getattr(args, name):
            query[name] = getattr(args, name)

    print(f"streaming {args.file} ({len(samples) / rate:.1f} s at {rate} Hz) to {url}",
          file=sys.stderr)
    try:
        result = await client.stream_audio(url, samples, rate, key=key, query=query,
                                           fast=args.fast, speed=args.speed,
                                           frame_ms=args.frame_ms, on_message=client.show)
    except InvalidStatus as exc:
        print(f"edge: {url} refused: HTTP {exc.response.status_code} "
              f"{exc.response.body.decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"edge: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    client.write_outputs(result, args.file, args.jsonl, args.rttm)
    meta = result.metadata
    print(f"closed {result.close_code} {result.close_reason}".rstrip()
          + (f"; {meta['duration']:.1f} s, request {meta['request_id']}" if meta else ""),
          file=sys.stderr)
    return 0 if result.close_code == 1000 else 1


def commands() -> list[Register]:
    """Every command's `add_<name>`, in `edge --help` order."""
    # Imported here: edge.cli_diarization uses this module's client helpers.
    from edge.cli_diarization import add_diarize, add_eval, add_model

    return [add_serve, add_status, add_stream, add_check, add_model, add_diarize, add_eval]


if __name__ == "__main__":
    sys.exit(main())
