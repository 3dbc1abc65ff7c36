"""`flowbp`: the controller's command line for people (a thin client of the REST API).

    flowbp submit CONFIG.yaml [--set a.b=value ...] [--name N] [--label k=v ...] [--idempotency-key K]
    flowbp jobs [--state S ...] [--label k=v ...] [--limit N]
    flowbp status ID
    flowbp logs ID [--follow] [--tail N]
    flowbp cancel ID

The address and token come from --url / --token or FLOWBP_URL / FLOWBP_TOKEN. The YAML file is the same run
schema the API takes (flowbp_core.config.RunConfig); `--set` uses the same dotted overrides as the training
entrypoint. The token is sent only in the Authorization header and never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import yaml

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "failed", "cancelled"}


class CliError(Exception):
    pass


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0):
        if not token:
            raise CliError("no token: pass --token or set FLOWBP_TOKEN")
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"})
        self.url = url

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise CliError(f"cannot reach the controller at {self.url}: {e}") from None
        if r.status_code >= 400:
            raise CliError(_explain(r))
        return r.json()


def _explain(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail")
    except (json.JSONDecodeError, AttributeError):
        detail = r.text[:500]
    if isinstance(detail, list):  # 422: one line per broken rule, with its field path
        lines = []
        for d in detail:
            loc = ".".join(str(p) for p in d.get("loc", []) if p != "body")
            got = f" (got {d['input']!r})" if "input" in d and not isinstance(d["input"], (dict, list)) else ""
            lines.append(f"  {loc}: {d.get('msg')}{got}")
        return f"rejected ({r.status_code}):\n" + "\n".join(lines)
    return f"error {r.status_code}: {detail}"


# ---- formatting ----
def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def table(rows: list[list[str]], headers: list[str], max_width: int = 60) -> str:
    cells = [[str(c) if len(str(c)) <= max_width else str(c)[: max_width - 3] + "..." for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*r) for r in cells]
    return "\n".join(line.rstrip() for line in out)


def _ckpt(j: dict) -> str:
    c = j.get("latest_checkpoint")
    return f"step_{c['step']}" if c else "-"


# ---- commands ----
def cmd_submit(c: Client, a: argparse.Namespace) -> int:
    from flowbp_core.config import apply_overrides, load_yaml

    path = Path(a.config)
    if not path.is_file():
        raise CliError(f"config file {path} does not exist")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CliError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise CliError(f"{path} must hold a YAML mapping (the run config) at the top level")
    try:
        data = apply_overrides(data, a.set)
    except ValueError as e:
        raise CliError(str(e)) from None
    body: dict[str, Any] = {"name": a.name or path.stem, "config": data, "labels": _pairs(a.label, "--label")}
    if a.max_resubmits is not None:
        body["max_resubmits"] = a.max_resubmits
    headers = {"Content-Type": "application/json"}
    if a.idempotency_key:
        headers["Idempotency-Key"] = a.idempotency_key
    # Python's encoder writes NaN and Infinity as JSON literals (httpx's refuses them), so a run file's `.nan`
    # reaches the controller, whose 422 names the field instead of the CLI failing with a traceback.
    job = c.call("POST", "/v1/jobs", content=json.dumps(body), headers=headers)
    print(f"{job['id']}  {job['state']}  run {job['run_id']}")
    if a.wait:
        return _wait(c, job["id"])
    return 0


def _wait(c: Client, job_id: str) -> int:
    last = None
    while True:
        j = c.call("GET", f"/v1/jobs/{job_id}")
        if j["state"] != last:
            print(f"{_when(j['updated_at'])}  {j['state']:<10} {j['reason']}")
            last = j["state"]
        if j["state"] in TERMINAL:
            return 0 if j["state"] == "succeeded" else 1
        time.sleep(2)


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise CliError(f"{flag} {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def cmd_jobs(c: Client, a: argparse.Namespace) -> int:
    params: list[tuple[str, Any]] = [("limit", a.limit)]
    params += [("state", s) for s in a.state or []] + [("label", kv) for kv in a.label or []]
    page = c.call("GET", "/v1/jobs", params=params)
    rows = [[j["id"], j["name"], j["state"], str(j["attempts"]), _ckpt(j), _age(j["created_at"]), j["reason"]]
            for j in page["jobs"]]
    if not rows:
        print("no jobs")
        return 0
    print(table(rows, ["ID", "NAME", "STATE", "TRIES", "CHECKPOINT", "AGE", "REASON"]))
    if page.get("next_cursor") is not None:
        print(f"(more: raise --limit; showing {len(rows)})")
    return 0


def cmd_status(c: Client, a: argparse.Namespace) -> int:
    j = c.call("GET", f"/v1/jobs/{a.id}")
    info = [("id", j["id"]), ("name", j["name"]), ("state", j["state"]), ("reason", j["reason"]),
            ("run", j["run_id"]), ("labels", ", ".join(f"{k}={v}" for k, v in j["labels"].items()) or "-"),
            ("ray job", j.get("ray_submission_id") or "-"), ("ray status", j.get("ray_status") or "-"),
            ("attempts", f"{j['attempts']} (up to {j['max_resubmits']} resubmissions)"),
            ("checkpoint", _ckpt(j)), ("created", _when(j["created_at"])), ("updated", _when(j["updated_at"]))]
    w = max(len(k) for k, _ in info)
    for k, v in info:
        print(f"{k:<{w}}  {v}")
    print()
    print(table([[_when(t["at"]), t["state"], t["reason"]] for t in j["history"]], ["TIME", "STATE", "REASON"],
                max_width=400))
    return 0


def cmd_logs(c: Client, a: argparse.Namespace) -> int:
    chunk = c.call("GET", f"/v1/jobs/{a.id}/logs", params={"tail": a.tail})
    sys.stdout.write(chunk["text"])
    if not a.follow:
        return 0
    offset, sub = chunk["offset"], chunk["ray_submission_id"]
    while True:
        j = c.call("GET", f"/v1/jobs/{a.id}")  # read before the log: a drained log then holds all j has seen
        text = ""
        if sub:
            chunk = c.call("GET", f"/v1/jobs/{a.id}/logs", params={"offset": offset, "submission": sub})
            text, offset = chunk["text"], chunk["offset"]
            sys.stdout.write(text)
            sys.stdout.flush()
        current = j.get("ray_submission_id")
        if current != sub and not text:  # resubmitted, and the old attempt's log is read to its end
            sub, offset = current, 0
            if sub:
                print(f"\n--- {j['reason']} ---")
            continue
        if j["state"] in TERMINAL and not text:
            print(f"--- job {j['state']}: {j['reason']}")
            return 0 if j["state"] == "succeeded" else 1
        if not text:
            time.sleep(a.interval)


def cmd_cancel(c: Client, a: argparse.Namespace) -> int:
    j = c.call("POST", f"/v1/jobs/{a.id}/cancel")
    print(f"{j['id']}  {j['state']}  {j['reason']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowbp", description="Submit and follow FlowBP jobs on a controller.")
    p.add_argument("--url", default=os.environ.get("FLOWBP_URL", DEFAULT_URL),
                   help="controller URL (env FLOWBP_URL; default %(default)s)")
    p.add_argument("--token", default=None, help="bearer token (env FLOWBP_TOKEN)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("submit", help="submit a run config (YAML)")
    s.add_argument("config")
    s.add_argument("--set", action="append", metavar="A.B=VALUE", help="override a field (repeatable)")
    s.add_argument("--name", help="job name (default: the file name)")
    s.add_argument("--label", action="append", metavar="K=V")
    s.add_argument("--max-resubmits", type=int)
    s.add_argument("--idempotency-key", help="repeat a submit safely: the same key returns the first job")
    s.add_argument("--wait", action="store_true", help="wait until the job finishes (exit 1 unless it succeeds)")
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("jobs", help="list jobs, newest first")
    s.add_argument("--state", action="append", choices=["pending", "submitted", "running", "succeeded", "failed",
                                                        "cancelled"])
    s.add_argument("--label", action="append", metavar="K=V")
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(fn=cmd_jobs)

    s = sub.add_parser("status", help="one job in detail, with its history")
    s.add_argument("id")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("logs", help="a job's log (current Ray attempt)")
    s.add_argument("id")
    s.add_argument("--follow", "-f", action="store_true")
    s.add_argument("--tail", type=int, default=200)
    s.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_logs)

    s = sub.add_parser("cancel", help="cancel a job")
    s.add_argument("id")
    s.set_defaults(fn=cmd_cancel)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        client = Client(a.url, a.token or os.environ.get("FLOWBP_TOKEN"))
        return a.fn(client, a)
    except CliError as e:
        print(f"flowbp: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
