"""What one message's building blocks cost on this machine: msgpack.packb under the node's
malloc thresholds and under others, and Ed25519 signing and checking by libsodium (PyNaCl)
and OpenSSL (cryptography) by message size. The figures behind swarmnode/node.py's malloc
thresholds, and behind signing with libsodium alone: OpenSSL signs large messages cheaper,
but loading it costs every node 7 MiB (docs/benchmarks.md).

    .venv/bin/python bench/message_cost.py [--repeats 5]

CPU time of the calling thread (time.thread_time), median of the repeats; packb also in
wall time, since an unmapped page costs the other threads' TLBs too. Each malloc setting runs
in a fresh process: mallopt cannot be undone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: (label, mmap threshold, trim threshold): 0 leaves glibc's dynamic default.
MALLOC = (("glibc default", 0, 0), ("mmap 256 KiB (the node before)", 256 << 10, 0),
          ("mmap 512 KiB", 512 << 10, 0), ("the node's", -1, -1))
SIZES = (200, 4 << 10, 16 << 10, 64 << 10, 256 << 10)

PACKB = """
import ctypes, json, statistics, sys, threading, time
import msgpack
mmap, trim, repeats = (int(a) for a in sys.argv[1:4])
if mmap == -1:
    from swarmnode.node import _fix_malloc_thresholds
    _fix_malloc_thresholds()
else:
    libc = ctypes.CDLL("libc.so.6")
    if mmap:
        libc.mallopt(-3, mmap)
    if trim:
        libc.mallopt(-1, trim)
stop = threading.Event()  # a node has other threads: an munmap interrupts them too
for t in [threading.Thread(target=stop.wait) for _ in range(3)]:
    t.start()
envelope = [1, "election.append_entries", "a" * 52, 1_700_000_000_000, 12345, b"x" * 200,
            b"y" * 64]
runs = []
for _ in range(repeats):
    w, c = time.perf_counter(), time.thread_time()
    for _ in range(20_000):
        msgpack.packb(envelope, use_bin_type=True)
    runs.append(((time.thread_time() - c) / 20_000 * 1e6, (time.perf_counter() - w) / 20_000 * 1e6))
stop.set()
print(json.dumps([round(statistics.median(r[0] for r in runs), 2),
                  round(statistics.median(r[1] for r in runs), 2)]))
"""


def cpu_us(fn: Callable[[], object], repeats: int, calls: int) -> float:
    runs = []
    for _ in range(repeats):
        c = time.thread_time()
        for _ in range(calls):
            fn()
        runs.append((time.thread_time() - c) / calls * 1e6)
    return round(statistics.median(runs), 1)


def ed25519(repeats: int) -> list[dict[str, float | int]]:
    import nacl.signing
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    sk = nacl.signing.SigningKey.generate()
    ossl = Ed25519PrivateKey.from_private_bytes(bytes(sk))
    ossl_pk = Ed25519PublicKey.from_public_bytes(bytes(sk.verify_key))
    rows = []
    for size in SIZES:
        m = b"m" * size
        sig = sk.sign(m).signature
        assert ossl.sign(m) == sig  # deterministic: the same bytes
        calls = max(10, (2 << 20) // max(size, 1024))
        rows.append({"bytes": size,
                     "libsodium_sign_us": cpu_us(lambda m=m: sk.sign(m), repeats, calls),
                     "openssl_sign_us": cpu_us(lambda m=m: ossl.sign(m), repeats, calls),
                     "libsodium_verify_us": cpu_us(
                         lambda m=m, s=sig: sk.verify_key.verify(m, s), repeats, calls),
                     "openssl_verify_us": cpu_us(
                         lambda m=m, s=sig: ossl_pk.verify(s, m), repeats, calls)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    print("| msgpack.packb of a heartbeat envelope, 4 threads | CPU (us) | wall (us) |")
    print("|---|---:|---:|")
    for label, mmap, trim in MALLOC:
        out = subprocess.run([sys.executable, "-c", PACKB, str(mmap), str(trim),
                              str(args.repeats)], capture_output=True, text=True, check=True,
                             cwd=root, env={"PYTHONPATH": str(root)}).stdout
        cpu, wall = json.loads(out)
        print(f"| {label} | {cpu} | {wall} |")
    print()
    print("| Ed25519, CPU (us) | libsodium sign | OpenSSL sign | libsodium verify | "
          "OpenSSL verify |")
    print("|---:|---:|---:|---:|---:|")
    for r in ed25519(args.repeats):
        print(f"| {r['bytes']:,} B | {r['libsodium_sign_us']} | {r['openssl_sign_us']} | "
              f"{r['libsodium_verify_us']} | {r['openssl_verify_us']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
