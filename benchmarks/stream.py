#!/usr/bin/env python3
"""Benchmarks of the streaming input path (data.pipeline=stream); every subcommand prints one JSON line.

  generate OUT [--count 20000 --size 256]
      A folder of JPEGs made from Fashion-MNIST (enlarged, tinted, with noise) in ImageNet's layout
      (OUT/train/<class>/*.jpg), for the others.
  decode SOURCE [--image-size 224 --crop random|center|none --workers 1,2 --read-ahead 2,16 --seconds 20]
      Training batches decoded and cropped per second by the Grain pipeline alone (no model), for each
      worker count: img_per_s and img_per_s_per_worker.
  memory -- CNNCLI_TRAIN_ARGS...
      Runs `cnncli train ARGS` and samples memory once a second: the training process's RSS and, with
      its Grain workers, the PSS of the whole process tree (shared pages counted once). Prints the peaks,
      the peak per tenth of the run (flat means no growth), and the epochs' img/s.
  train -- CNNCLI_TRAIN_ARGS...
      Runs `cnncli train ARGS` and prints {"img_per_s": ...}, the median of the epochs after the first
      (which includes compilation): a command for side_by_side.py, e.g.
        python benchmarks/side_by_side.py \
          --a "python benchmarks/stream.py train -- lenet5_fashion_mnist -s data.source=arrayrecord:FM \
               -s data.pipeline=stream" \
          --b "python benchmarks/stream.py train -- lenet5_fashion_mnist -s data.source=arrayrecord:FM \
               -s data.pipeline=memory"
      (the commands as docs/data.md gives them, on one line each)

GPU utilisation is not measured here: no accelerator was available to this work.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GB = 1024**3


def generate(args) -> dict:
    """Fashion-MNIST training images, enlarged to size x size and tinted per image (so the 3 channels differ),
    saved as JPEG (quality 90) in ImageNet's layout: OUT/train/<class>/<index>.jpg."""
    import gzip

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from cnncli.data.sources.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM_DIR

    root = Path(args.fashion_mnist or FASHION_MNIST_SYSTEM_DIR)
    with gzip.open(root / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if args.count > len(images):
        sys.exit(f"--count {args.count}: Fashion-MNIST has {len(images)} training images")
    rng = np.random.default_rng(0)
    noise = rng.integers(-8, 9, (16, args.size, args.size, 3), dtype=np.int16)  # drawn once: per image it is slow
    for name in FASHION_MNIST_CLASSES:
        (Path(args.out) / "train" / name.replace("/", "_")).mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        big = np.asarray(Image.fromarray(images[i]).resize((args.size, args.size), Image.BICUBIC), np.int16)
        tint = rng.integers(128, 257, 3, dtype=np.int16)
        rgb = np.clip(((big[..., None] * tint) >> 8) + noise[i % len(noise)], 0, 255).astype(np.uint8)
        name = FASHION_MNIST_CLASSES[labels[i]].replace("/", "_")
        Image.fromarray(rgb).save(Path(args.out) / "train" / name / f"{i:06d}.jpg", quality=90)
    files = list(Path(args.out).rglob("*.jpg"))
    return {"out": args.out, "images": len(files), "jpeg_bytes": sum(f.stat().st_size for f in files),
            "decoded_bytes": len(files) * args.size * args.size * 3}


def decode(args) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from cnncli.data import stream as stream_lib
    from cnncli.data.pipeline import load_data
    from cnncli.recipe import DataConfig, RandomResizedCropConfig

    results = []
    ahead_values = [int(a) for a in args.read_ahead.split(",")] if args.read_ahead else [None]
    for workers, ahead in [(int(w), a) for w in args.workers.split(",") for a in ahead_values]:
        if ahead is not None:  # batches each worker decodes at once, instead of cnncli's choice
            stream_lib.read_ahead = lambda batch_bytes, prefetch, n=ahead: n
        config = DataConfig(source=args.source, pipeline="stream", image_size=(args.image_size, args.image_size),
                            random_resized_crop=RandomResizedCropConfig() if args.crop == "random" else None,
                            eval_crop=0.875 if args.crop == "center" else None, workers=workers,
                            preprocess="scale", val_fraction=0.0, jpeg_draft=args.jpeg_draft)
        splits = load_data(config, seed=0)
        stream = splits.train_stream(epochs=1000, batch=args.batch_size, eval_batch=args.batch_size,
                                     rows=(0, args.batch_size), eval_rows=(0, args.batch_size), seed=0,
                                     to_device=lambda element: None)
        for _ in range(max(2, workers * 2)):  # workers started, buffers full
            stream.next()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < args.seconds:
            stream.next()
            n += args.batch_size
        rate = n / (time.perf_counter() - t0)
        stream.close()
        results.append({"source": args.source, "workers": workers, "image_size": args.image_size,
                        "crop": {"random": "random_resized", "center": "center 0.875", "none": "resize"}[args.crop],
                        "jpeg_draft": args.jpeg_draft, "read_ahead": ahead or "cnncli", "img_per_s": round(rate, 1),
                        "img_per_s_per_worker": round(rate / max(workers, 1), 1), "load_average": os.getloadavg()[0]})
        print(json.dumps(results[-1]), flush=True)
    return results


def _train(argv: list[str], sample=None) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = Path(tempfile.mkdtemp(prefix="stream-bench-")) / "run"
    cmd = [sys.executable, "-m", "cnncli", "train", *argv, "--run-dir", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(proc.pid, stop), daemon=True) if sample else None
    if sampler:
        sampler.start()
    out, err = proc.communicate()
    stop.set()
    if sampler:
        sampler.join()
    if proc.returncode != 0:
        sys.exit(f"cnncli train failed ({proc.returncode}):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), run_dir


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(args) -> dict:
    _, run_dir = _train(args.argv)
    rows = _epochs(run_dir)
    rates = [r["img_per_s"] for r in rows[1:]] or [rows[-1]["img_per_s"]]
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    return {"img_per_s": statistics.median(rates), "epochs": [r["img_per_s"] for r in rows],
            "input_wait_s": [r.get("input_wait_s") for r in rows]}


def memory(args) -> dict:
    import psutil

    samples = []

    def sample(pid: int, stop: threading.Event) -> None:
        main = psutil.Process(pid)
        start = time.monotonic()
        while not stop.is_set():
            try:
                rss = main.memory_info().rss
                pss = 0
                for p in [main, *main.children(recursive=True)]:
                    try:
                        pss += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                samples.append((time.monotonic() - start, rss, pss))
            except psutil.NoSuchProcess:
                break
            stop.wait(1.0)

    result, run_dir = _train(args.argv, sample)
    rows = _epochs(run_dir)
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    # the training part: from the first sample after compilation-heavy start to the end (tenths of the run)
    tenths = []
    for k in range(10):
        part = [s for s in samples if k / 10 <= s[0] / samples[-1][0] < (k + 1) / 10]
        if part:
            tenths.append([round(max(s[1] for s in part) / GB, 3), round(max(s[2] for s in part) / GB, 3)])
    return {"peak_rss_main_gb": round(max(s[1] for s in samples) / GB, 3),
            "peak_pss_total_gb": round(max(s[2] for s in samples) / GB, 3),
            "per_tenth_rss_main_pss_total_gb": tenths, "samples": len(samples), "seconds": round(samples[-1][0], 1),
            "epochs_img_per_s": [r["img_per_s"] for r in rows],
            "input_wait_s": [r.get("input_wait_s") for r in rows], "load_average": os.getloadavg()[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("out")
    g.add_argument("--count", type=int, default=20000)
    g.add_argument("--size", type=int, default=256)
    g.add_argument("--fashion-mnist", help="directory of the Fashion-MNIST IDX files (default: Debian's)")
    d = sub.add_parser("decode")
    d.add_argument("source")
    d.add_argument("--image-size", type=int, default=224)
    d.add_argument("--crop", choices=("random", "center", "none"), default="random",
                   help="random-resized crops (training), resize + 0.875 center crop (evaluation), or a plain resize")
    d.add_argument("--jpeg-draft", action="store_true")
    d.add_argument("--workers", default="1,2")
    d.add_argument("--read-ahead", help="batches each worker decodes at once, e.g. 2,4,8,16 (default: cnncli's)")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--seconds", type=float, default=20.0)
    for name in ("memory", "train"):
        t = sub.add_parser(name)
        t.add_argument("argv", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if getattr(args, "argv", None) and args.argv[0] == "--":
        args.argv = args.argv[1:]
    result = {"generate": generate, "decode": decode, "memory": memory, "train": train}[args.command](args)
    if args.command != "decode":
        print(json.dumps(result))


if __name__ == "__main__":
    main()
