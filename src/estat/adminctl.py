"""``estat admin``: the admin API from the command line.

``estat admin token create --name N --scopes read,replay`` prints a new
token and the ``ADMIN_TOKENS`` entry for it (only the SHA-256 is ever
configured). The other commands call a running estat's admin listener:
``--url`` / ``ESTAT_ADMIN_URL`` (default: the server's ``ADMIN_ADDR``, read
from the environment or ``.env`` as the server reads it) and
``--token`` / ``ESTAT_ADMIN_TOKEN``; tables by default, JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

from estat.admin.auth import new_token
from estat.settings.admin import SCOPES, admin_url


def add_admin_parser(sub: Any) -> None:
    a = sub.add_parser(
        "admin",
        help="the admin API: tokens, outbox, dispatch, completeness, traces, workers, audit",
    )
    _common(a, None, None, False)
    asub = a.add_subparsers(dest="admin_command", required=True)
    tok = asub.add_parser("token", help="admin tokens")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", help="print a new token and its ADMIN_TOKENS entry")
    tc.add_argument("--name", required=True)
    tc.add_argument("--scopes", required=True, help=f"comma-separated: {', '.join(SCOPES)}")
    ob = asub.add_parser("outbox", help="seed 004's outbox summary and replay")
    osub = ob.add_subparsers(dest="outbox_command", required=True)
    osub.add_parser("summary", help="pendingCount, failedCount, publishedCount, maxRetryCount")
    rp = osub.add_parser("replay", help="publish FAILED and due PENDING rows now")
    rp.add_argument("--limit", type=int, default=100, help="1..500 (default 100)")
    rp.add_argument("--dry-run", action="store_true", help="count only")
    rp.add_argument("--event-name", default=None)
    rp.add_argument("--from", dest="created_from", default=None, help="created_at >= (ISO 8601)")
    rp.add_argument("--to", dest="created_to", default=None, help="created_at < (ISO 8601)")
    dp = asub.add_parser("dispatch", help="the dispatch outbox and the circuits of its targets")
    dsub = dp.add_subparsers(dest="dispatch_command", required=True)
    dsub.add_parser("summary", help="rows per target by status, max retries, oldest due")
    dr = dsub.add_parser(
        "replay", help="make FAILED rows (parked ones too) due now, attempts reset"
    )
    dr.add_argument("--limit", type=int, default=100, help="1..500 (default 100)")
    dr.add_argument("--target", default=None, help="POSTHOG, WEBHOOK (default: every target)")
    dr.add_argument("--dry-run", action="store_true", help="count only")
    dr.add_argument("--from", dest="created_from", default=None, help="created_at >= (ISO 8601)")
    dr.add_argument("--to", dest="created_to", default=None, help="created_at < (ISO 8601)")
    dr.add_argument(
        "--all",
        action="store_true",
        help="every FAILED row created before the run, each once: calls of --limit (up to 500)",
    )
    dd = dsub.add_parser(
        "discard", help="delete the rows still to be sent of a target no longer configured"
    )
    dd.add_argument("--target", required=True, help="a target not in DISPATCH_TARGETS")
    dd.add_argument("--limit", type=int, default=100_000, help="1..100000 (default 100000)")
    dd.add_argument("--dry-run", action="store_true", help="count only")
    dc = dsub.add_parser("circuit", help="each target's circuit breaker; --reset TARGET closes one")
    dc.add_argument("--reset", metavar="TARGET", default=None, help="close this target's circuit")
    cp = asub.add_parser(
        "completeness", help="events per dataset and hour: accepted, in the lake, stored, delivered"
    )
    cp.add_argument("--from", dest="start", default=None, help="hour >= (ISO 8601; 24 h ago)")
    cp.add_argument("--to", dest="end", default=None, help="hour < (ISO 8601; now)")
    tr = asub.add_parser("traces", help="the MQ trace rows of one message, newest first")
    tr.add_argument("message_id")
    tr.add_argument("--limit", type=int, default=50, help="1..200 (default 50)")
    wk = asub.add_parser(
        "workers", help="list, pause or resume the relay, store, dispatcher, dlq-replayer"
    )
    wsub = wk.add_subparsers(dest="workers_command")
    wsub.add_parser("list", help="every worker's pause state (the default)")
    for verb in ("pause", "resume"):
        wp = wsub.add_parser(verb, help=f"{verb} a worker in every process")
        wp.add_argument("name", help="relay, store, dispatcher or dlq-replayer")
    au = asub.add_parser("audit", help="the latest admin calls")
    au.add_argument("--limit", type=int, default=20)
    _after_the_command(a)


def _common(p: argparse.ArgumentParser, url: Any, token: Any, json: Any) -> None:
    p.add_argument(
        "--url",
        default=url,
        help="admin listener (ESTAT_ADMIN_URL; default: ADMIN_ADDR from the environment or .env)",
    )
    p.add_argument("--token", default=token, help="bearer token (ESTAT_ADMIN_TOKEN)")
    p.add_argument("--json", action="store_true", default=json, help="print the JSON answer")


def _after_the_command(p: argparse.ArgumentParser) -> None:
    """``--url``, ``--token`` and ``--json`` where people type them too,
    after the command (``estat admin dispatch summary --json``); a level
    that does not see one leaves the value given before it."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                s = argparse.SUPPRESS
                _common(child, s, s, s)
                _after_the_command(child)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, dict):  # completeness's dispatched: {target: n}
        return ", ".join(f"{k}={_cell(x)}" for k, x in v.items()) or "-"
    return str(v)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _create_token(args: argparse.Namespace) -> int:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    bad = [s for s in scopes if s not in SCOPES]
    if not scopes or bad:
        print(f"estat: scopes are {', '.join(SCOPES)}", file=sys.stderr)
        return 2
    token, digest = new_token()
    entry = f"{args.name}:{'+'.join(scopes)}:{digest}"
    from estat.settings.admin import parse_admin_tokens

    try:
        parse_admin_tokens(entry)
    except ValueError as e:
        print(f"estat: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"token": token, "entry": entry}))
    else:
        print(f"token (give it to the caller; it is not stored anywhere): {token}")
        print(
            f"ADMIN_TOKENS entry (add it, comma-separated, or a line of ADMIN_TOKENS_FILE): {entry}"
        )
    return 0


def _dispatch_request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    base = "/api/v1/admin/dispatch"
    if args.dispatch_command == "summary":
        return "GET", f"{base}/summary", {}
    if args.dispatch_command == "circuit":
        if args.reset:
            return "POST", f"{base}/circuits/{args.reset.upper()}/reset", {}
        return "GET", f"{base}/circuits", {}
    params: dict[str, Any] = {"limit": args.limit, "dryRun": str(args.dry_run).lower()}
    if args.dispatch_command == "discard":
        return "POST", f"{base}/discard", {**params, "target": args.target}
    for k, v in (("target", args.target), ("from", args.created_from), ("to", args.created_to)):
        if v is not None:
            params[k] = v
    return "POST", f"{base}/replay", params


class _Failed(Exception):
    """A call refused or unanswered (already said on stderr): the exit status."""

    def __init__(self, status: int) -> None:
        self.status = status


def _call(url: str, method: str, path: str, params: dict[str, Any], headers: dict[str, str]) -> Any:
    """The admin API's answer to one call; a refusal or no answer is said
    on stderr and raised as ``_Failed`` (2: refused, 1: the server's fault
    or no answer)."""
    import httpx  # here, not at import: every command builds this parser

    try:
        resp = httpx.request(method, url + path, params=params, headers=headers, timeout=30)
    except httpx.HTTPError as e:
        print(f"estat: cannot reach the admin listener at {url}: {e}", file=sys.stderr)
        raise _Failed(1) from None
    try:
        body = resp.json()
    except ValueError:
        body = {"code": "NOT_JSON", "message": resp.text[:300]}
    if resp.status_code >= 400:
        print(
            f"estat: {resp.status_code} {body.get('code')}: {body.get('message')}", file=sys.stderr
        )
        raise _Failed(1 if resp.status_code >= 500 else 2)
    return body


def _replay_all(url: str, headers: dict[str, str], args: argparse.Namespace) -> int:
    """``dispatch replay --all``: calls of ``--limit`` rows, each after the
    last row id of the one before (``afterId``), until one takes none: every
    FAILED row created before the run (or ``--to``) once, never one the
    destination refused again meanwhile."""
    if args.dry_run:
        print("estat: --all replays; `estat admin dispatch summary` counts them", file=sys.stderr)
        return 2
    method, path, params = _dispatch_request(args)
    # the rows there are now: not those a refusing destination keeps adding
    params.setdefault("to", datetime.now(UTC).isoformat())
    done = 0
    try:
        while (body := _call(url, method, path, params, headers))["replayedCount"]:
            done += int(body["replayedCount"])
            params["afterId"] = body["lastId"]
            if not args.json:
                print(f"replayed {done:,}", file=sys.stderr)
    except _Failed as f:
        return f.status
    result = {"replayedCount": done, "target": params.get("target"), "dryRun": False}
    print(json.dumps(result) if args.json else _table([result], list(result)))
    return 0


def run_admin_command(args: argparse.Namespace) -> int:
    if args.admin_command == "token":
        return _create_token(args)
    url = (args.url or admin_url()).rstrip("/")
    token = args.token or os.environ.get("ESTAT_ADMIN_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    method, path, params = "GET", "", {}
    if args.admin_command == "outbox" and args.outbox_command == "summary":
        path = "/api/v1/admin/user-activity/outbox/summary"
    elif args.admin_command == "outbox":
        method, path = "POST", "/api/v1/admin/user-activity/outbox/replay"
        params = {"limit": args.limit, "dryRun": str(args.dry_run).lower()}
        for k, v in (
            ("eventName", args.event_name),
            ("from", args.created_from),
            ("to", args.created_to),
        ):
            if v is not None:
                params[k] = v
    elif args.admin_command == "dispatch" and args.dispatch_command == "replay" and args.all:
        return _replay_all(url, headers, args)
    elif args.admin_command == "dispatch":
        method, path, params = _dispatch_request(args)
    elif args.admin_command == "completeness":
        path = "/api/v1/admin/completeness"
        params = {k: v for k, v in (("from", args.start), ("to", args.end)) if v is not None}
    elif args.admin_command == "workers" and args.workers_command in ("pause", "resume"):
        method, path = "POST", f"/api/v1/admin/workers/{args.name}/{args.workers_command}"
    elif args.admin_command == "workers":
        path = "/api/v1/admin/workers"
    elif args.admin_command == "traces":
        path = "/api/v1/admin/mq-traces"
        params = {"messageId": args.message_id, "limit": args.limit}
    else:
        path = "/api/v1/admin/audit"
        params = {"limit": args.limit}
    try:
        body = _call(url, method, path, params, headers)
    except _Failed as f:
        return f.status
    if args.json:
        print(json.dumps(body))
    elif isinstance(body, dict):
        print(_table([body], list(body)))
    elif args.admin_command in ("dispatch", "completeness", "workers"):
        print(_table(body, list(body[0]) if body else ["none"]))
    elif args.admin_command == "traces":
        print(
            _table(
                body,
                [
                    "createdAt",
                    "stage",
                    "provider",
                    "consumerGroup",
                    "processingMillis",
                    "errorMessage",
                ],
            )
        )
    else:
        print(
            _table(
                body, ["createdAt", "tokenName", "client", "method", "route", "status", "effect"]
            )
        )
    return 0
