"""Background-response throughput: posts N `background: true` responses (32 at a time,
spread over the given instances), then polls each instance's /admin/stats until their
`background.completed` counts have moved by N; prints the rates and the claim wait.
With `--rate R` the jobs are posted at R per second instead (below what the workers
run, so the claim wait is the engine's pick-up latency, not a backlog draining).

    python3 bench/background_jobs.py N ADMIN_KEY http://127.0.0.1:8080 [http://127.0.0.1:8081 …] [--rate R]

The gateways need an alias `plain` (the bench's mock model) and the admin key. Claim
wait percentiles are the instances' figures since they started: use fresh ones.
"""
import concurrent.futures
import json
import sys
import time
import urllib.request

args = sys.argv[1:]
RATE = None
if "--rate" in args:
    i = args.index("--rate")
    RATE = float(args[i + 1])
    del args[i : i + 2]
N, ADMIN, BASES = int(args[0]), args[1], args[2:]


def post(i):
    req = urllib.request.Request(
        BASES[i % len(BASES)] + "/v1/responses",
        data=json.dumps({"model": "plain", "input": f"job {i}", "background": True}).encode(),
        headers={"content-type": "application/json"},
    )
    return json.load(urllib.request.urlopen(req))["id"]


def stats(base):
    req = urllib.request.Request(base + "/admin/stats", headers={"authorization": "Bearer " + ADMIN})
    return json.load(urllib.request.urlopen(req))["background"]


def completed():
    return sum(stats(b)["completed"] for b in BASES)


before = completed()
t0 = time.time()
with concurrent.futures.ThreadPoolExecutor(32) as pool:
    if RATE is None:
        list(pool.map(post, range(N)))
    else:
        futures = []
        for i in range(N):
            pause = t0 + i / RATE - time.time()
            if pause > 0:
                time.sleep(pause)
            futures.append(pool.submit(post, i))
        for f in futures:
            f.result()
t1 = time.time()
while completed() - before < N:
    time.sleep(0.05)
t2 = time.time()
waits = [round(stats(b)["mean_claim_wait_ms"], 1) for b in BASES]
percentiles = [
    "{p50}/{p99}/{max}".format(**stats(b)["claim_wait_ms"]) for b in BASES
]
print(
    f"{len(BASES)} instance(s): queued {N} in {t1 - t0:.2f}s ({N / (t1 - t0):.0f}/s); "
    f"all completed after {t2 - t0:.2f}s ({N / (t2 - t0):.0f} jobs/s); "
    f"completed per instance {[stats(b)['completed'] for b in BASES]}; mean claim wait {waits} ms; "
    f"claim wait P50/P99/max {percentiles} ms"
)
