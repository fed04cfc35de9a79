"""What serving a policy over HTTP (``vla-ft serve``) adds to a prediction: the median time of
``predict_action`` called directly and through :class:`vla_ft.serve.PolicyClient` to ``vla-ft serve``
in another process on this machine (localhost: encoding, HTTP and copies, no network).

    python benchmarks/serve_latency.py runs/quickstart --size 224 --cameras-batch 1 --requests 50
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np

from vla_ft import VLAPolicy
from vla_ft.serve import IMAGE_PREFIX, PolicyClient, encode


def median_ms(call, n: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--size", type=int, default=224, help="camera frames are SIZE x SIZE x 3")
    p.add_argument("--batch", type=int, default=1, help="observations per request")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    policy = VLAPolicy.from_pretrained(args.checkpoint, args.device)
    command = [sys.executable, "-m", "vla_ft", "serve", args.checkpoint, "--port", "0", "--device", args.device]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    client = PolicyClient(server.stdout.readline().split(" at ", 1)[1].split()[0])
    rng = np.random.default_rng(0)
    shape = (args.batch,) if args.batch > 1 else ()
    frames = {c: rng.integers(0, 256, (*shape, args.size, args.size, 3), dtype=np.uint8) for c in policy.cameras}
    state = rng.normal(size=(*shape, policy.meta["history"], policy.meta["state_dim"])).astype(np.float32)
    state = state[..., 0, :] if policy.meta["history"] == 1 else state
    task = "pick up the red block"
    direct = median_ms(lambda: policy.predict_action(frames, task, state), args.requests)
    served = median_ms(lambda: client.predict_action(frames, task, state), args.requests)
    body = encode({**{IMAGE_PREFIX + c: f for c, f in frames.items()}, "state": state, "instruction": np.array(task)})
    print(
        f"{len(policy.cameras)} camera(s) of {args.size}x{args.size}, batch {args.batch}, {args.device}, "
        f"request {len(body) / 1e3:.0f} kB, median of {args.requests}"
    )
    print("| path | ms |\n|---|---:|")
    print(f"| predict_action | {direct:.2f} |\n| PolicyClient -> vla-ft serve | {served:.2f} |")
    print(f"| added by serving | {served - direct:.2f} |")
    client.close()
    server.terminate()
    server.wait()


if __name__ == "__main__":
    main()
