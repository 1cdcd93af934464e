"""A deterministic, realistic log file for the throughput benchmark.

The mix (by lines): structured JSON app logs, nginx "combined" access logs, plain text
app logs, and multi-line Python tracebacks (each traceback line is a line of the file,
as an app writes them to stderr), about 190 bytes per line on average. A small share of
the JSON lines carry an ``exc_info`` field with escaped newlines (``\\n``), as
python-json-logger writes exceptions; a little non-ASCII UTF-8 appears in messages.

The file is cached next to a ``.meta.json`` sidecar and rebuilt only when it is missing
or was made with other parameters (lines, seed, generator version, exc_info share).
"""

from __future__ import annotations

import json
import os
import random
import time

GENERATOR_VERSION = 3
CHUNK_EVENTS = 20_000  # events rendered per write

LEVELS = ["INFO"] * 14 + ["DEBUG"] * 4 + ["WARNING"] * 2 + ["ERROR"]
LOGGERS = ["app.api.orders", "app.api.users", "app.jobs.sync", "app.db.pool", "app.cache",
           "app.payments.stripe", "app.auth", "app.search.indexer", "uvicorn.access", "app.mail"]
PATHS = ["/api/v1/orders", "/api/v1/users", "/api/v1/cart/items", "/api/v1/search", "/healthz",
         "/api/v1/payments/intents", "/static/js/app.3f9a1c.js", "/api/v2/catalog/products",
         "/login", "/api/v1/notifications/unread"]
METHODS = ["GET"] * 8 + ["POST"] * 3 + ["PUT", "DELETE", "PATCH"]
STATUSES = [200] * 30 + [201, 204, 301, 302, 304, 304, 400, 401, 403, 404, 404, 409, 429, 500, 502, 503]
AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "curl/8.5.0", "python-requests/2.32.3", "Go-http-client/1.1", "kube-probe/1.31",
    "ELB-HealthChecker/2.0",
]
REFERERS = ["-", "-", "https://shop.example.com/", "https://shop.example.com/cart",
            "https://www.google.com/", "https://shop.example.com/search?q=chaussures+d%C3%A9t%C3%A9"]
MESSAGES = [
    "order created", "order shipped to customer", "user logged in", "cache miss, loading from database",
    "payment intent confirmed", "slow query detected", "retrying request after timeout",
    "connection returned to pool", "rate limit exceeded for client", "email queued for delivery",
    "indexed batch of documents", "session refreshed", "feature flag evaluated",
    "commande validée pour Zoë Müller", "配送先住所を更新しました", "webhook delivered ✅",
]
PLAIN = [
    "synced {n} records for tenant {tenant} in {secs:.3f}s",
    "worker heartbeat: queue depth {n}, in flight {m}",
    "connection pool stats: size={n} idle={m} waiting=0",
    "GC pause {m}ms, heap {n}MB after collection",
    "scheduled job cleanup_sessions finished: removed {n} expired sessions",
    "upstream {host} responded in {m}ms (status {status})",
    "user {user} updated profile fields: email, display_name",
]
TENANTS = ["acme", "globex", "initech", "umbrella", "hooli", "stark-industries", "wayne-enterprises"]
HOSTS = ["payments.internal:8443", "search.internal:9200", "10.0.3.17:6379", "auth.internal:443"]
FRAMES = [
    ('/srv/app/.venv/lib/python3.12/site-packages/starlette/routing.py', 'handle', 'await self.app(scope, receive, send)'),
    ('/srv/app/.venv/lib/python3.12/site-packages/fastapi/routing.py', 'app', 'raw_response = await run_endpoint_function('),
    ('/srv/app/app/api/orders.py', 'create_order', 'order = await service.place(payload, user=current_user)'),
    ('/srv/app/app/services/orders.py', 'place', 'total = self.pricing.total(cart, coupon=payload.coupon)'),
    ('/srv/app/app/services/pricing.py', 'total', 'return sum(item.price * item.quantity for item in cart.items)'),
    ('/srv/app/app/db/session.py', 'execute', 'result = await self.connection.execute(statement, params)'),
    ('/srv/app/.venv/lib/python3.12/site-packages/asyncpg/connection.py', '_do_execute', 'result, stmt = await executor(stmt, None)'),
    ('/srv/app/app/clients/payments.py', 'confirm', 'response.raise_for_status()'),
    ('/srv/app/.venv/lib/python3.12/site-packages/httpx/_models.py', 'raise_for_status', 'raise HTTPStatusError(message, request=request, response=self)'),
]
EXCEPTIONS = [
    "ValueError: invalid literal for int() with base 10: 'abc'",
    "KeyError: 'customer_id'",
    "asyncpg.exceptions.UniqueViolationError: duplicate key value violates unique constraint \"orders_pkey\"",
    "httpx.HTTPStatusError: Server error '503 Service Unavailable' for url 'https://payments.internal:8443/v1/intents'",
    "TimeoutError: timed out waiting for connection from pool",
    "TypeError: unsupported operand type(s) for *: 'NoneType' and 'int'",
]


def _traceback_lines(rng: random.Random) -> list[str]:
    lines = ["Traceback (most recent call last):"]
    for path, func, code in rng.sample(FRAMES, rng.randint(3, 7)):
        lines.append(f'  File "{path}", line {rng.randint(12, 900)}, in {func}')
        lines.append(f"    {code}")
    lines.append(rng.choice(EXCEPTIONS))
    return lines


class _Clock:
    """Monotonic fake time, formatted cheaply (the second part is cached)."""

    def __init__(self, start: float):
        self.ms = int(start * 1000)
        self._sec = -1
        self.iso = self.clf = self.plain = ""

    def tick(self, rng: random.Random) -> int:
        self.ms += rng.randint(0, 3)
        sec, ms = divmod(self.ms, 1000)
        if sec != self._sec:
            self._sec = sec
            t = time.gmtime(sec)
            self.iso = time.strftime("%Y-%m-%dT%H:%M:%S", t)
            self.clf = time.strftime("%d/%b/%Y:%H:%M:%S +0000", t)
            self.plain = time.strftime("%Y-%m-%d %H:%M:%S", t)
        return ms


def _events(rng: random.Random, clock: _Clock, exc_json_share: float, count: int) -> list[str]:
    """``count`` events as text; an event is one line, or several for a traceback."""
    out: list[str] = []
    append = out.append
    r = rng.random
    ri = rng.randint
    choice = rng.choice
    for _ in range(count):
        ms = clock.tick(rng)
        kind = r()
        if kind < 0.46:  # structured JSON
            level = choice(LEVELS)
            record = (f'{{"ts":"{clock.iso}.{ms:03d}Z","level":"{level}","logger":"{choice(LOGGERS)}",'
                      f'"msg":"{choice(MESSAGES)}","request_id":"{rng.getrandbits(64):016x}",'
                      f'"user_id":{ri(1, 999999)},"path":"{choice(PATHS)}/{ri(1, 99999)}",'
                      f'"duration_ms":{r() * 900:.2f},"status":{choice(STATUSES)}')
            if r() < exc_json_share:
                tb = "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in _traceback_lines(rng))
                record += f',"exc_info":"{tb}"'
            append(record + ',"service":"shop-api","version":"2.14.1"}\n')
        elif kind < 0.79:  # nginx combined access log
            append(f'10.{ri(0, 255)}.{ri(0, 255)}.{ri(1, 254)} - - [{clock.clf}] '
                   f'"{choice(METHODS)} {choice(PATHS)}/{ri(1, 99999)}?page={ri(1, 20)} HTTP/1.1" '
                   f'{choice(STATUSES)} {ri(0, 80000)} "{choice(REFERERS)}" "{choice(AGENTS)}" {r():.3f}\n')
        elif kind < 0.985:  # plain text app log
            text = choice(PLAIN).format(n=ri(1, 5000), m=ri(1, 300), secs=r() * 5, tenant=choice(TENANTS),
                                        host=choice(HOSTS), status=choice(STATUSES), user=ri(1, 999999))
            append(f"{clock.plain},{ms:03d} {choice(LEVELS)} [worker-{ri(1, 16)}] {choice(LOGGERS)}: {text}\n")
        else:  # an error with its traceback, one file line per traceback line
            append(f"{clock.plain},{ms:03d} ERROR [worker-{ri(1, 16)}] {choice(LOGGERS)}: "
                   f"unhandled exception while processing request {rng.getrandbits(64):016x}\n"
                   + "\n".join(_traceback_lines(rng)) + "\n")
    return out


def generate(path: str, lines: int, seed: int, exc_json_share: float) -> dict:
    """Write exactly ``lines`` lines to ``path`` (atomically); return the metadata."""
    rng = random.Random(seed)
    clock = _Clock(1_795_000_000.0)  # late 2026
    tmp = path + ".tmp"
    written = 0
    size = 0
    with open(tmp, "wb", buffering=0) as out:
        while written < lines:
            text = "".join(_events(rng, clock, exc_json_share, CHUNK_EVENTS))
            produced = text.count("\n")
            if written + produced > lines:  # cut the last chunk at exactly ``lines`` lines
                cut = -1
                for _ in range(lines - written):
                    cut = text.index("\n", cut + 1)
                text = text[:cut + 1]
                produced = lines - written
            data = text.encode("utf-8")
            out.write(data)
            written += produced
            size += len(data)
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return {"version": GENERATOR_VERSION, "lines": lines, "seed": seed, "exc_json_share": exc_json_share,
            "bytes": size}


def ensure(path: str, lines: int, seed: int, exc_json_share: float, log=print) -> dict:
    """The cached file's metadata, generating the file first when missing or made differently."""
    meta_path = path + ".meta.json"
    wanted = {"version": GENERATOR_VERSION, "lines": lines, "seed": seed, "exc_json_share": exc_json_share}
    try:
        with open(meta_path) as handle:
            meta = json.load(handle)
        if all(meta.get(k) == v for k, v in wanted.items()) and os.path.getsize(path) == meta["bytes"]:
            log(f"using cached {path} ({lines:,} lines, {meta['bytes'] / 1e6:.1f} MB)")
            return meta
    except (OSError, ValueError, KeyError):
        pass
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    started = time.monotonic()
    log(f"generating {path} ({lines:,} lines, seed {seed}) ...")
    meta = generate(path, lines, seed, exc_json_share)
    with open(meta_path, "w") as handle:
        json.dump(meta, handle)
    log(f"  {meta['bytes'] / 1e6:.1f} MB, {meta['bytes'] / lines:.1f} bytes/line, "
        f"in {time.monotonic() - started:.1f}s")
    return meta
