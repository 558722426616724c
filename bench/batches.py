"""Batch API throughput: uploads an N-line chat batch (alias `plain`), creates the batch,
polls it until it ends, and prints lines per second, the request counts and how long
validation and the run took.

    python3 bench/batches.py N http://127.0.0.1:8080

No SDK needed: plain HTTP with a hand-built multipart body.
"""
import json
import sys
import time
import urllib.request

N, BASE = int(sys.argv[1]), sys.argv[2]
BOUNDARY = "----switchyard-bench"


def call(method, path, body=None, headers=None):
    req = urllib.request.Request(BASE + path, data=body, method=method, headers=headers or {})
    return json.load(urllib.request.urlopen(req))


lines = "\n".join(
    json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "plain", "messages": [{"role": "user", "content": f"line {i}"}]}})
    for i in range(N)
).encode()
body = (
    f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
    f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n\r\n"
).encode() + lines + f"\r\n--{BOUNDARY}--\r\n".encode()
t0 = time.time()
file = call("POST", "/v1/files", body, {"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
t1 = time.time()
batch = call("POST", "/v1/batches", json.dumps({
    "input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h",
}).encode(), {"content-type": "application/json"})
while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
    time.sleep(0.1)
    batch = call("GET", f"/v1/batches/{batch['id']}")
t2 = time.time()
run = batch["completed_at"] - batch["created_at"]
validating = (batch["in_progress_at"] or batch["created_at"]) - batch["created_at"]
print(
    f"{N} lines: upload {len(body) / 1e6:.1f} MB in {t1 - t0:.2f}s; batch {batch['status']} "
    f"after {t2 - t1:.2f}s ({N / (t2 - t1):.0f} lines/s; validation ~{validating}s); "
    f"counts {batch['request_counts']}"
)
