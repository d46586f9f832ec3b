"""SSD core forward+backward time vs sequence length: naive recurrence / quadratic / chunked (/ mamba-ssm).

    python benchmarks/bench_ssd.py [--lengths 20 50 200 1000] [--batch 8] [--repeats 3] [--device cpu|cuda]

Shapes default to MMM4Rec's (heads 8, head_dim 64, groups 8, d_state 64, chunk 32). Every column is
measured in the same process, one after the other, best of ``--repeats`` runs after a warm-up; the
ratio columns compare them side by side. The mamba-ssm column appears only on CUDA with mamba-ssm.
"""

import argparse
import time

import torch

from recbole_mm.model.layers.ssd import discretization_step, mamba_chunk_scan_kernel, ssd, ssd_naive
from recbole_mm.experiments.measure import machine_description  # noqa: E402


def make_inputs(batch, length, heads, head_dim, groups, d_state, device):
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(batch, length, heads, head_dim, generator=gen)
    dt = torch.randn(batch, length, heads, generator=gen) - 2.0
    A = -torch.empty(heads).uniform_(1, 16, generator=gen)
    B = torch.randn(batch, length, groups, d_state, generator=gen)
    C = torch.randn(batch, length, groups, d_state, generator=gen)
    D = torch.ones(heads)
    return [t.to(device).requires_grad_(True) for t in (x, dt, A, B, C, D)]


def time_forward_backward(fn, inputs, repeats, device, clock=time.perf_counter):
    def once():
        for t in inputs:
            t.grad = None
        x, dt, A, B, C, D = inputs
        fn(x, discretization_step(dt), A, B, C, D).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up (and Triton compilation on CUDA)
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        once()
        best = min(best, clock() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[20, 50, 200, 1000])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--d_state", type=int, default=64)
    parser.add_argument("--chunk_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: one torch thread, CPU time of this process (robust on a shared, overloaded "
                             "machine where wall time mostly measures waiting); CUDA always uses wall time")
    args = parser.parse_args()
    clock = time.perf_counter
    if args.clock == "cpu" and args.device == "cpu":
        torch.set_num_threads(1)
        clock = time.process_time

    chunk = args.chunk_size
    methods = {
        "naive": ssd_naive,
        "quadratic": lambda *a: ssd(*a, chunk_size=chunk, impl="torch_quadratic"),
        "chunked": lambda *a: ssd(*a, chunk_size=chunk, impl="torch_chunked"),
    }
    if args.device == "cuda" and mamba_chunk_scan_kernel() is not None:
        methods["mamba_ssm"] = lambda *a: ssd(*a, chunk_size=chunk, impl="mamba_ssm")

    print(f"machine: {machine_description()}; clock: "
          f"{'CPU time of this process' if clock is time.process_time else 'wall time'}")
    print(f"forward+backward, batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, "
          f"groups {args.groups}, d_state {args.d_state}, chunk {chunk}, best of {args.repeats} (ms)")
    header = ["L"] + [f"{m} ms" for m in methods] + ["naive/chunked"]
    if "mamba_ssm" in methods:
        header.append("chunked/mamba_ssm")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for length in args.lengths:
        inputs = make_inputs(args.batch, length, args.heads, args.head_dim, args.groups, args.d_state, args.device)
        times = {name: time_forward_backward(fn, inputs, args.repeats, args.device, clock) for name, fn in methods.items()}
        row = [str(length)] + [f"{1000 * times[m]:.1f}" for m in methods]
        row.append(f"{times['naive'] / times['chunked']:.1f}x")
        if "mamba_ssm" in methods:
            row.append(f"{times['chunked'] / times['mamba_ssm']:.1f}x")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
