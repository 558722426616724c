"""WebSocket subscribers: opens N sockets to /v1/events, each following one of N/100
conversations, then runs a streamed turn on one conversation and times how long its 100
subscribers take to see its end; prints the gateway's RSS (from /proc) before, with all
sockets open, and after.

    python3 bench/event_subscribers.py N http://127.0.0.1:8080 GATEWAY_PID

Needs the `websockets` package (the SDK's `openai[realtime]` brings it).
"""
import asyncio
import json
import sys
import time
import urllib.request

import websockets

N, BASE, PID = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
WS = BASE.replace("http://", "ws://") + "/v1/events"


def rss_mib():
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def post(path, body):
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return urllib.request.urlopen(req).read()


async def subscriber(conversation, opened, ended):
    async with websockets.connect(WS, max_queue=None, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "subscribe", "conversation": conversation}))
        await ws.recv()
        opened.append(1)
        async for message in ws:
            event = json.loads(message)
            if event.get("event", {}).get("type") == "response.completed":
                ended.append(time.time())
                return


async def main():
    conversations = [json.loads(post("/v1/conversations", {}))["id"] for _ in range(max(1, N // 100))]
    before = rss_mib()
    opened, ended = [], []
    tasks = []
    t0 = time.time()
    for i in range(N):
        tasks.append(asyncio.create_task(subscriber(conversations[i % len(conversations)], opened, ended)))
        if i % 500 == 499:
            await asyncio.sleep(0.05)
    while len(opened) < N:
        await asyncio.sleep(0.1)
    t1 = time.time()
    await asyncio.sleep(2)
    with_all = rss_mib()
    start = time.time()
    await asyncio.get_running_loop().run_in_executor(None, post, "/v1/responses", {
        "model": "plain", "input": "to every subscriber", "conversation": conversations[0], "stream": True})
    while len(ended) < len(range(0, N, len(conversations))):
        await asyncio.sleep(0.01)
    seen = max(ended) - start
    print(f"{N} sockets open in {t1 - t0:.1f}s; gateway RSS {before:.1f} -> {with_all:.1f} MiB "
          f"({(with_all - before) * 1024 / N:.1f} KiB per socket); a streamed turn reached its "
          f"{len(ended)} subscribers within {seen * 1000:.0f} ms of its request")
    for task in tasks:
        task.cancel()


asyncio.run(main())
