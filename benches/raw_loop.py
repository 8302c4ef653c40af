"""What a Python user writes: redis-py with hiredis, XREADGROUP COUNT 500, one XACK per batch.

Run by benches/pipeline.rs (case p) as `python raw_loop.py <url> <stream> <group> <n>`: drains `n`
entries as consumer "py", then exits. Needs `redis` and `hiredis` (scripts/bench installs both,
pinned, into target/bench-venv).
"""
import sys

import redis

url, stream, group, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r = redis.Redis.from_url(url)
assert redis.utils.HIREDIS_AVAILABLE, "hiredis is not installed: the reference would be slower"
done = 0
while done < n:
    got = r.xreadgroup(group, "py", {stream: ">"}, count=500, block=1000)
    if not got:
        continue
    ids = [entry_id for entry_id, _ in got[0][1]]
    r.xack(stream, group, *ids)
    done += len(ids)
