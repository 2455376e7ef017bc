#!/usr/bin/env python3
"""Idle websocket memory: opens N upgraded connections through a proxy, measures the proxy's RSS
(summed over the given pids) before and after, holds them idle, then checks that every one still
relays a message. Standard library only (the handshake and frames are a few bytes each).

    idle_ws.py --port 19004 --pids 1234 [--count 4000] [--tls --sni localhost] [--hold 5]

Prints one line: `count=N ok=N rss_before_kib=B rss_after_kib=A kib_per_conn=K`.
"""
import argparse
import asyncio
import base64
import os
import ssl
import sys


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def masked_frame(payload: bytes) -> bytes:
    """A client text frame (masked, as RFC 6455 requires), payload under 126 bytes."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


async def open_ws(args, tls):
    r, w = await asyncio.open_connection(
        args.host, args.port, ssl=tls, server_hostname=args.sni if tls else None, limit=4096
    )
    key = base64.b64encode(os.urandom(16)).decode()
    w.write(
        (
            f"GET {args.path} HTTP/1.1\r\nHost: {args.sni}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await w.drain()
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"no upgrade: {head[:80]!r}")
    return r, w


async def echo(r, w, msg: bytes) -> bool:
    w.write(masked_frame(msg))
    await w.drain()
    hdr = await asyncio.wait_for(r.readexactly(2), 30)
    data = await asyncio.wait_for(r.readexactly(hdr[1] & 0x7F), 30)
    return data == msg


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/ws")
    p.add_argument("--sni", default="localhost")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--count", type=int, default=4000)
    p.add_argument("--pids", required=True, help="comma-separated pids of the proxy")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to stay idle before the echo check")
    args = p.parse_args()
    pids = [int(x) for x in args.pids.split(",") if x]
    tls = None
    if args.tls:
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    before = rss_kib(pids)
    sem = asyncio.Semaphore(200)

    async def one():
        async with sem:
            return await open_ws(args, tls)

    conns = await asyncio.gather(*(one() for _ in range(args.count)))
    await asyncio.sleep(2)
    after = rss_kib(pids)
    await asyncio.sleep(max(0.0, args.hold - 2))
    oks = await asyncio.gather(*(echo(r, w, b"still there?") for r, w in conns), return_exceptions=True)
    ok = sum(1 for o in oks if o is True)
    for _, w in conns:
        w.close()
    per = (after - before) / max(1, args.count)
    print(f"count={args.count} ok={ok} rss_before_kib={before} rss_after_kib={after} kib_per_conn={per:.1f}")
    sys.stdout.flush()
    return 0 if ok == args.count else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
