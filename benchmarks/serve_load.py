"""Load test of `bertkit serve` on loopback: throughput and p50/p99 latency at 1, 8 and 32 concurrent clients, with
dynamic batching and without it, against the same texts run one by one through the model in this process.

    python benchmarks/serve_load.py --model RUN_SST2                 # a classifier run folder of `bertkit finetune`
    python benchmarks/serve_load.py --model RUN_SST2 --requests 64   # quicker

Each client sends one SST-2 dev sentence per request ({"inputs": text}) and sends the next when the answer arrives;
the clients share one list of --requests sentences, so every level serves the same texts. Three ways are timed:
- "one by one": no server; the same sentences, each alone, through the model (`bertkit.serve.Predictor.run` on one
  input: tokenize, forward at batch 1, softmax), one after the other: what `bertkit predict` does per line;
- "server, no batching": `bertkit serve --max-batch-size 1`, so each request is its own forward pass;
- "server, dynamic batching": `bertkit serve --max-batch-size 32 --max-wait-ms W`.
The server and the clients share the machine: the server gets --threads torch threads, the clients run in this
process's event loop. Every level stops after --requests requests or --timeout seconds, whichever comes first, and
the servers are stopped with SIGTERM at the end. Only loopback (127.0.0.1) is used.

Writes benchmarks/results/serve_load.json and prints the markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import machine  # noqa: E402


def sentences(data: Path, n: int) -> list[str]:
    lines = (data / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines]
    return (texts * (n // len(texts) + 1))[:n]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary(latencies: list[float], seconds: float, errors: int) -> dict:
    return {"requests": len(latencies), "errors": errors, "seconds": round(seconds, 3),
            "requests_per_s": len(latencies) / seconds, "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99), "mean_ms": 1000 * statistics.fmean(latencies)}


def one_by_one(model: Path, texts: list[str], threads: int) -> dict:
    """The same texts, each alone through the model in this process, one after the other."""
    import torch

    from bertkit.serve import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor(model, batch_size=1)
    predictor.run([predictor.example(texts[0], "warm-up")])
    latencies, start = [], time.perf_counter()
    for text in texts:
        t = time.perf_counter()
        predictor.run([predictor.example(text, "text")])
        latencies.append(time.perf_counter() - t)
    return summary(latencies, time.perf_counter() - start, 0)


class Server:
    """`bertkit serve` in a subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(self, model: Path, threads: int, batch: int, wait_ms: float):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bertkit.cli", "serve", str(model), "--port", "0", "--threads", str(threads),
             "--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms)],
            stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if " on http://" not in line:
            self.process.kill()
            raise SystemExit(f"bertkit serve did not start: {line!r}")
        self.url = line.split(" on ")[1].split()[0]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


async def load(url: str, texts: list[str], clients: int, timeout: float) -> dict:
    import httpx

    queue = list(reversed(texts))
    latencies, errors = [], 0
    deadline = time.perf_counter() + timeout

    async def client(http):
        nonlocal errors
        while queue and time.perf_counter() < deadline:
            text = queue.pop()
            t = time.perf_counter()
            response = await http.post(f"{url}/predict", json={"inputs": text})
            if response.status_code == 200:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        await http.post(f"{url}/predict", json={"inputs": texts[0]})  # warm-up
        before = (await http.get(f"{url}/health")).json()
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
        after = (await http.get(f"{url}/health")).json()
    result = summary(latencies, seconds, errors)
    batches = after["batches"] - before["batches"]
    result["mean_batch"] = (after["inputs"] - before["inputs"]) / batches if batches else 0.0
    return result


def table(result: dict) -> str:
    base = result["one by one"]
    lines = ["| way | clients | requests/s | × one by one | p50 ms | p99 ms | mean batch |", "|---" * 7 + "|",
             f"| one by one (no server) | 1 | {base['requests_per_s']:.1f} | 1.00× | {base['p50_ms']:.1f} | "
             f"{base['p99_ms']:.1f} | 1 |"]
    for way in ("server, no batching", "server, dynamic batching"):
        for clients, r in result[way].items():
            lines.append(f"| {way} | {clients} | {r['requests_per_s']:.1f} | "
                         f"{r['requests_per_s'] / base['requests_per_s']:.2f}× | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['mean_batch']:.1f} |" + (f" ({r['errors']} errors)" if r["errors"] else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a fine-tuned classifier folder")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=256, help="requests per level (one sentence each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (and of one by one)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the batching server's --max-wait-ms")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds at most per level")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_load.json")
    args = parser.parse_args(argv)
    data = Path(os.environ.get("BERTKIT_DATA") or HERE.parent.parent / "shared" / "data")
    texts = sentences(data, args.requests)
    load_before = os.getloadavg()
    result = {"one by one": one_by_one(args.model, texts, args.threads)}
    print(f"one by one: {result['one by one']['requests_per_s']:.1f} requests/s", file=sys.stderr)
    for way, batch in (("server, no batching", 1), ("server, dynamic batching", 32)):
        server = Server(args.model, args.threads, batch, args.max_wait_ms)
        try:
            result[way] = {}
            for clients in args.clients:
                result[way][clients] = asyncio.run(load(server.url, texts, clients, args.timeout))
                print(f"{way}, {clients} clients: {result[way][clients]['requests_per_s']:.1f} requests/s",
                      file=sys.stderr)
        finally:
            code = server.stop()
        if code != 0:
            raise SystemExit(f"bertkit serve exited with status {code} on SIGTERM; expected 0")
    result["settings"] = vars(args) | {"model": str(args.model), "out": str(args.out)}
    result["machine"] = machine() | {"load_average_before": [round(x, 2) for x in load_before],
                                     "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
