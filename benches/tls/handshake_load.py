#!/usr/bin/env python3
"""Full-handshake load generator for benches/tls/run.sh.

Every request opens a new TCP connection, does a full TLS handshake (no
session is ever offered for resumption: each connection gets a new SSL object
and no saved session), sends one `GET PATH HTTP/1.1` with `Connection: close`,
reads the response to EOF and closes. wrk and h2load cannot measure this: both
resume TLS sessions when they reconnect (wrk keeps the session in the SSL
object it reuses, h2load caches it), so their "new connection" numbers are
resumed (PSK) handshakes that skip the certificate and its signature.

PROCS processes (default 2, like wrk -t2) each run CONNECTIONS/PROCS threads,
each thread a closed loop of one connection at a time. The handshake and the
socket I/O run in OpenSSL/the kernel with the GIL released, so the Python
overhead per request is small next to a handshake, but it is not zero: this
client costs more CPU per request than wrk would.

Output (stdout, one `key value` per line, for run.sh to parse):
  requests N        completed requests with the expected status
  errors N          failed connections, handshakes, reads or bad statuses
  reused N          connections that resumed a session (must be 0)
  seconds S         measured wall time
  rps R             requests / seconds
  p50_ms / p99_ms / mean_ms   latency of connect + handshake + request + response
  protocol / cipher of the last connection
  first_error TEXT  the first error seen, if any
"""

import argparse
import multiprocessing as mp
import socket
import ssl
import sys
import threading
import time


def worker(args, nthreads, start_at, queue):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # like wrk and h2load; the signature in CertificateVerify is still checked
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.sni}:{args.port}\r\n"
        "User-Agent: markco-bench-handshake\r\nConnection: close\r\n\r\n"
    ).encode()
    expect = f"HTTP/1.1 {args.status} ".encode()
    lock = threading.Lock()
    state = {"lat": [], "errors": 0, "reused": 0, "proto": "", "cipher": "", "first_error": ""}

    def loop():
        lat = []
        errors = reused = 0
        proto = cipher = first_error = ""
        deadline = start_at + args.duration
        while time.time() < deadline:
            t0 = time.perf_counter()
            s = None
            try:
                raw = socket.create_connection((args.addr, args.port), timeout=args.timeout)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s = ctx.wrap_socket(raw, server_hostname=args.sni)
                s.sendall(request)
                head = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    if len(head) < 64:
                        head += chunk
                if not head.startswith(expect):
                    raise RuntimeError(f"unexpected response: {head[:40]!r}")
                t1 = time.perf_counter()
                if time.time() > deadline:
                    break  # finished after the end: not counted, like wrk
                lat.append(t1 - t0)
                if s.session_reused:
                    reused += 1
                proto, cipher = s.version() or "", (s.cipher() or ("",))[0]
            except (OSError, RuntimeError, ValueError) as e:
                errors += 1
                if not first_error:
                    first_error = f"{type(e).__name__}: {e}"
            finally:
                if s is not None:
                    s.close()
        with lock:
            state["lat"].extend(lat)
            state["errors"] += errors
            state["reused"] += reused
            if proto:
                state["proto"], state["cipher"] = proto, cipher
            if first_error and not state["first_error"]:
                state["first_error"] = first_error

    now = time.time()
    if start_at > now:
        time.sleep(start_at - now)
    threads = [threading.Thread(target=loop) for _ in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(state)


def percentile(sorted_vals, q):
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(round(q * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--addr", default="127.0.0.1", help="address to connect to")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sni", default="localhost", help="server name (SNI and Host)")
    p.add_argument("--path", default="/")
    p.add_argument("--status", type=int, default=200, help="expected status")
    p.add_argument("--connections", type=int, default=32, help="concurrent connections in total")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--timeout", type=float, default=10.0, help="socket timeout, seconds")
    args = p.parse_args()
    if args.connections < args.procs:
        p.error("--connections must be >= --procs")

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    start_at = time.time() + 0.3  # all processes start together
    per = [args.connections // args.procs + (1 if i < args.connections % args.procs else 0) for i in range(args.procs)]
    procs = [ctx.Process(target=worker, args=(args, n, start_at, queue)) for n in per]
    for pr in procs:
        pr.start()
    results = [queue.get() for _ in procs]
    for pr in procs:
        pr.join()

    lat = sorted(x for r in results for x in r["lat"])
    errors = sum(r["errors"] for r in results)
    reused = sum(r["reused"] for r in results)
    proto = next((r["proto"] for r in results if r["proto"]), "")
    cipher = next((r["cipher"] for r in results if r["cipher"]), "")
    first_error = next((r["first_error"] for r in results if r["first_error"]), "")
    n = len(lat)
    print(f"requests {n}")
    print(f"errors {errors}")
    print(f"reused {reused}")
    print(f"seconds {args.duration:.3f}")
    print(f"rps {n / args.duration:.2f}")
    if n:
        print(f"p50_ms {percentile(lat, 0.50) * 1000:.3f}")
        print(f"p99_ms {percentile(lat, 0.99) * 1000:.3f}")
        print(f"mean_ms {sum(lat) / n * 1000:.3f}")
    print(f"protocol {proto or 'NA'}")
    print(f"cipher {cipher or 'NA'}")
    if first_error:
        print(f"first_error {first_error}")
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
