# metronome.py: a metronome in Python that prints every beat at its instant on the server's
# clock, in time with every other conductor client, without waiting for the beat's tick.
#
#   python3 -m pip install websockets          # or Debian's python3-websockets
#   python3 metronome.py ws://localhost:3000/ws [BEATS]
#
# One line a beat (asyncio's timers are good to a millisecond or two):
#
#   beat 3.2 (tick 1236) due 1764043200125.000 at 1764043200125.480 (0.48 ms late)
#
# `due` is the beat's instant and `at` the moment the line was printed, both on the server's
# clock (unix ms). Stop with Ctrl-C, or give BEATS to stop after that many.
#
# Its clock sync is the simple version of the algorithm in docs/protocol.md ("Clock sync"): the
# offset is the middle of the tightest bounds that the last 10 s of pings give (step 4 there,
# with the clocks' rate taken as zero). It leaves out the rate fit, the outlier rule and the
# slewing, which conductor.js and the Rust crate conductor-sync do.
import asyncio
import json
import math
import sys
import time

import websockets

WINDOW_MS = 10_000  # over 10 s, clocks 100 ppm apart drift 1 ms: keep the window short


def now():
    """This machine's clock, in ms: any clock that does not jump will do."""
    return time.monotonic() * 1000


samples = []  # (t3, a, b) of each pong in the window
timeline = {}  # the latest `timeline` event's data


def offset():
    """The server's clock minus ours, in ms: every forward value a = t1 - t0 is at least the
    offset (the request took no negative time), every backward value b = t2 - t3 at most it."""
    upper = min(a for _, a, _ in samples)
    lower = max(b for _, _, b in samples)
    return (upper + lower) / 2


async def receive(ws):
    async for text in ws:
        m, t3 = json.loads(text), now()
        if m["event"] == "timeline":
            timeline.clear()
            timeline.update(m["data"])
        elif m["event"] == "pong":
            d = m["data"]
            samples.append((t3, d["t1"] - d["t0"], d["t2"] - t3))
            while samples[0][0] < t3 - WINDOW_MS:
                samples.pop(0)
        elif m["event"] == "error":
            print("the server refused:", m["data"]["message"], file=sys.stderr)


async def ping(ws):
    # 4 a second: well inside the server's limit of 20 messages a second.
    while True:
        await ws.send(json.dumps({"event": "ping", "data": {"t0": now()}}))
        await asyncio.sleep(0.25)


def tick_time(n):
    """When tick n is due, on the server's clock (unix ms), by the latest timeline."""
    return (timeline["time_us"] + (n - timeline["count"]) * timeline["interval_us"]) / 1000


def next_beat(after):
    """The first beat after tick `after` that is at least 20 ms ahead."""
    ppqn, start = timeline["ppqn"], timeline["transport"]["count"]
    server_now = now() + offset()
    n = timeline["count"] + math.ceil(
        (server_now + 20 - timeline["time_us"] / 1000) * 1000 / timeline["interval_us"])
    n += (start - n) % ppqn  # beats count from the transport's start
    return max(n, after + ppqn)


async def main(url, beats):
    async with websockets.connect(url) as ws:
        tasks = [asyncio.create_task(receive(ws)), asyncio.create_task(ping(ws))]
        while len(samples) < 8 or not timeline:  # two seconds of pings, and the timeline
            await asyncio.sleep(0.05)
        last = -math.inf
        while beats > 0:
            n = next_beat(last)
            # Sleep until it is due; a new timeline or a better estimate moves the instant.
            while (wait := tick_time(n) - offset() - now()) > 0:
                await asyncio.sleep(min(wait, 50) / 1000)
            last, due = n, tick_time(n)
            tr = timeline["transport"]
            if tr["state"] != "playing" or n < tr["count"]:
                continue  # stopped: count on silently
            at = now() + offset()
            beat = (n - tr["count"]) // timeline["ppqn"]
            bar, beat = divmod(beat, timeline["beats_per_bar"])
            print(f"beat {bar + 1}.{beat + 1} (tick {n}) due {due:.3f} at {at:.3f} "
                  f"({at - due:.2f} ms late)", flush=True)
            beats -= 1
        for task in tasks:
            task.cancel()


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "ws://localhost:3000/ws"
    beats = int(sys.argv[2]) if len(sys.argv) > 2 else math.inf
    try:
        asyncio.run(main(url, beats))
    except KeyboardInterrupt:
        pass
