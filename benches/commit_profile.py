"""Instructions Redis spends per committed echo message: the commit script against raw loops.

    scripts/bench --commit-profile      (or: python benches/commit_profile.py [extra.lua ...])

Runs redis-server under `valgrind --tool=callgrind` (instruction counts are repeatable on a noisy VM,
wall-clock CPU is not), loads N five-field messages, reads them as a group in batches of B and
  ack     only acks them (the baseline subtracted below),
  raw     echoes each with a pipelined XADD of its fields, then one XACK,
  rawenv  the same, writing the 9 fields the daemon writes (the envelope too),
  script  commits them with the commit script exactly as the daemon sends it (src/client/commit.rs),
  *.lua   any extra script given, called with the same arguments (for trying variants).
Prints instructions per message in all and above `ack`. Needs valgrind and redis-py (N, B env vars).
"""
import os
import re
import struct
import subprocess
import sys
import tempfile
import time

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = re.search(r'pub const SOURCE: &str = r#"(.*?)"#;',
                   open(os.path.join(ROOT, "src/client/commit.rs")).read(), re.S).group(1)
N, B = int(os.environ.get("N", 20000)), int(os.environ.get("B", 500))
S, O, G = "nova:task:bench:tasks", "nova:task:bench:out", "g"
FIELDS = {"type": "task_created", "task_id": "t00000042", "title": "write the quarterly report, part 42",
          "priority": "high", "assignee": "mcp-server-boomerang@nova.example.org"}
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(r, kind, script):
    sha = r.script_load(script) if script else None
    done = 0
    while done < N:
        entries = r.xreadgroup(G, "c", {S: ">"}, count=B)[0][1]
        ids = [e[0] for e in entries]
        if kind == "ack":
            r.xack(S, G, *ids)
        elif kind in ("raw", "rawenv"):
            pipe = r.pipeline(transaction=False)
            for id, f in entries:
                if kind == "rawenv":
                    f = dict(f, _timestamp="1700000000000", _source="bench", _trace_id=TRACE,
                             _cause=S + "/" + id.decode())
                pipe.xadd(O, f)
            pipe.xack(S, G, *ids)
            pipe.execute()
        else:
            # The daemon's arguments: per message its id, then per reply the trace id and the fields;
            # the layout gives per message its write count, per write key index, values, kind 1.
            layout, args = b"", []
            for id, f in entries:
                layout += struct.pack(">HHHB", 1, 2, 1 + 2 * len(f), 1)
                args += [id, TRACE]
                for k, v in f.items():
                    args += [k, v]
            head = [G, "c", len(entries), layout, ids[0], ids[-1], B + 2016,
                    str(int(time.time() * 1000)), "bench"]
            verdicts = r.evalsha(sha, 2, S, O, *head, *args)
            assert all(v == 1 for v in verdicts), verdicts[:3]
        done += len(ids)
    assert r.xpending(S, G)["pending"] == 0


def measure(kind, script=None):
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "callgrind.out")
        p = subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out,
                              "redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            r = redis.Redis(port=port)
            for _ in range(300):
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
            pipe = r.pipeline(transaction=False)
            for i in range(N):
                pipe.xadd(S, FIELDS)
                if i % 2000 == 1999:
                    pipe.execute()
            pipe.execute()
            r.xgroup_create(S, G, "0")
            drive(r, kind, script)
        finally:
            p.send_signal(2)
            p.wait()
        total = next(l for l in open(out) if l.startswith(("totals:", "summary:")))
        return int(total.split()[1]) / N


def main():
    runs = [("ack", None), ("raw", None), ("rawenv", None), ("script", SOURCE)]
    runs += [(path, open(path).read()) for path in sys.argv[1:]]
    base = None
    print(f"{N} five-field messages, batches of {B}: redis-server instructions per message")
    print("| run | in all | above read + ack |")
    print("|---|---:|---:|")
    for name, script in runs:
        got = measure("script" if script else name, script)
        base = got if name == "ack" else base
        print(f"| {name} | {got / 1000:.1f}k | {(got - base) / 1000:.1f}k |", flush=True)


if __name__ == "__main__":
    main()
