#!/usr/bin/env python3
"""Run two benchmark commands in turn (A B A B ...) and print the median ratio A/B of img_per_s.

Each command must print, as its last line, a JSON object with an "img_per_s" field
(torch_peer.py does; so must `cnncli benchmark --json`). Shared machines are noisy, so only
ratios measured in one run, pair by pair, are meaningful.

Usage:
  python side_by_side.py --rounds 3 \
      --a "cnncli benchmark --model resnet18 --batch-size 128 --mode train --json" \
      --b "python benchmarks/torch_peer.py --model resnet18 --batch-size 128 --mode train"
Prints one JSON line: {"a": [...], "b": [...], "ratio_median": r, "ratios": [...]}
"""
import argparse
import json
import shlex
import statistics
import subprocess
import sys


def run(cmd: str) -> float:
    out = subprocess.run(shlex.split(cmd), capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.strip().splitlines() if line.strip().startswith("{")]
    if out.returncode != 0 or not lines:
        sys.exit(f"command failed ({out.returncode}): {cmd}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(json.loads(lines[-1])["img_per_s"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True)
    p.add_argument("--b", required=True)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    a, b = [], []
    for _ in range(args.rounds):
        a.append(run(args.a))
        b.append(run(args.b))
    ratios = [x / y for x, y in zip(a, b)]
    print(json.dumps({"a": a, "b": b, "ratios": [round(r, 3) for r in ratios],
                      "ratio_median": round(statistics.median(ratios), 3)}))


if __name__ == "__main__":
    main()
