"""Stage-2 step time and FLOP utilisation on a GPU or TPU: ViT-B/16 in bfloat16.

    python benchmarks/accelerator_check.py [--arch ViT-B/16] [--classes 200,500] [--batch 32]
        [--top-k 8] [--dtype bfloat16] [--attention einsum,dot_product,cudnn] [--remat 0,1]
        [--repeats 10] [--no-elimination] [--chunk-tail single,padded] [--matmul-size 8192]

The training job's stage-2 step (`dpc_step.build`: CoOp+DPC, reference mode, DHNO 'reference',
random weights, one device) for every combination of class count, attention kernel
(`config.clip.attention`), remat (`config.clip.remat`) and the stage-2 step's chunk tail
(`config.dpc.chunk_tail`: on an accelerator one row at a time may use the device poorly).
Prints the device kind and the measured matmul throughput in the compute dtype (n x n @ n x n),
then one line per combination: compile seconds, the median step time, the executed FLOPs
(`dpc_step.flop_account`: XLA's count with the eliminated work's loops counted as run) and
their ratio to the minimal work, FLOP utilisation (FLOPs / step time / measured matmul
throughput), the valid negatives (of B*K), the compiled step's memory
(`memory_analysis`: arguments + outputs + temporaries) and the device's peak bytes in use so far
(`device.memory_stats()`, where the backend has it; it only grows within a process). A
combination that fails (e.g. 'cudnn' off GPU) prints its error and the others still run.

A manual check for an accelerator, never run in CI. On a CPU, `--arch tiny --repeats 1` checks
that it runs (the default attentions there are einsum and dot_product).

    python benchmarks/accelerator_check.py --memory LEARNER:PART:DTYPE [--arch ViT-B/16]
        [--dataset imagenet] [--text-chunk N]

checks one row of `benchmarks/memory.py`'s table instead: the same program (its `Setup`) is
compiled for the device, its compiled peak printed, then run once on zero-filled inputs and the
device's `peak_bytes_in_use` printed beside it. Run one row per process (the device's peak
only grows within a process), e.g. `for r in coop:stage1:bfloat16 maple:stage1:float32; do
python benchmarks/accelerator_check.py --memory $r; done`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dpc_step  # noqa: E402  (the benchmark next to this file)
from dpc_jax import cli  # noqa: E402

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def check(arch: str, num_classes: int, batch: int, top_k: int, dtype: str, attention: str,
          remat: bool, repeats: int, eliminate: bool, peak: float, tokenizer,
          chunk_tail: str = "single") -> dict:
    t0 = time.perf_counter()
    built = dpc_step.build(arch, num_classes, batch, top_k, tokenizer=tokenizer, dtype=dtype,
                           attention=attention, remat=remat, dedupe_text=eliminate,
                           compact_negatives=eliminate, chunk_tail=chunk_tail)
    compiled = built.step.lower(*built.args).compile()
    compile_s = time.perf_counter() - t0
    step_s, (_, _, metrics) = dpc_step._time(compiled, *built.args, repeats=repeats,
                                             output=True)
    valid = int(np.asarray(metrics["valid_negatives"])[0])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    account = dpc_step.flop_account(built, float(cost.get("flops", 0.0)), valid)
    flops = account["executed"]
    mem = compiled.memory_analysis()
    step_bytes = None if mem is None else (mem.argument_size_in_bytes
                                           + mem.output_size_in_bytes + mem.temp_size_in_bytes)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(compile=compile_s, step=step_s, flops=flops, util=flops / step_s / peak,
                minimal=account["minimal"],
                valid=valid, step_bytes=step_bytes, peak_bytes=stats.get("peak_bytes_in_use"))


def memory_check(spec: str, arch: str, dataset: str, text_chunk) -> None:
    """One `benchmarks/memory.py` row: compiled peak beside the device's measured peak."""
    import memory  # the benchmark beside this file

    fields = spec.split(":")
    if len(fields) != 3 or fields[1] not in memory.PARTS:
        sys.exit(cli.print_error(f"--memory {spec!r}; expected LEARNER:PART:DTYPE with PART "
                                 f"one of {', '.join(memory.PARTS)}"))
    learner, part, dtype = fields
    tokenizer = memory._tokenizer()
    names = memory.standin_names(tokenizer, memory.data_registry.get(dataset).num_classes)
    setup = memory.Setup(learner, arch, dataset, "base_to_new", dtype, text_chunk, tokenizer,
                         names)
    built = setup.program(part)
    if built is None:
        sys.exit(cli.print_error(f"--memory {spec!r}: DPC does not run on {learner!r}"))
    fn, args = built
    compiled = fn.lower(*args).compile()
    figures = memory.memory(compiled)
    real = jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x,
        args)
    jax.block_until_ready(compiled(*real))
    stats = jax.devices()[0].memory_stats() or {}
    print(f"{spec}: compiled peak {_gib(figures.get('peak_bytes'))} GiB (args "
          f"{_gib(figures.get('argument_bytes'))}, temp {_gib(figures.get('temp_bytes'))}); "
          f"device peak_bytes_in_use {_gib(stats.get('peak_bytes_in_use'))} GiB "
          f"({jax.devices()[0].device_kind})", flush=True)


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2 ** 30:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B/16", help="a clip.CONFIGS name ('tiny' on CPU)")
    parser.add_argument("--classes", default="200,500")
    parser.add_argument("--batch", type=int, default=32, help="B per device")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--attention", default=None,
                        help="comma list of einsum, dot_product, cudnn (default: all three on "
                             "GPU, einsum,dot_product elsewhere)")
    parser.add_argument("--remat", default="0,1", help="comma list of 0 and 1")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-elimination", action="store_true",
                        help="config.dpc.dedupe_text and compact_negatives off")
    parser.add_argument("--chunk-tail", default="single,padded",
                        help="comma list of config.dpc.chunk_tail values")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="n of the throughput matmul (default 8192, 1024 on CPU)")
    parser.add_argument("--memory", default="",
                        help="LEARNER:PART:DTYPE: check one benchmarks/memory.py row instead")
    parser.add_argument("--dataset", default="imagenet", help="with --memory")
    parser.add_argument("--text-chunk", type=int, default=None,
                        help="with --memory: config.clip.text_chunk (default: the config's)")
    args = parser.parse_args()
    if args.memory:
        memory_check(args.memory, args.arch, args.dataset, args.text_chunk)
        return
    device = jax.devices()[0]
    gpu = device.platform == "gpu"
    attentions = (args.attention or ("einsum,dot_product,cudnn" if gpu
                                     else "einsum,dot_product")).split(",")
    remats = [bool(int(r)) for r in args.remat.split(",")]
    n = args.matmul_size or (1024 if device.platform == "cpu" else 8192)
    peak = dpc_step.matmul_flops_per_s(n=n, repeats=max(args.repeats, 3),
                                       dtype=DTYPES[args.dtype])
    eliminate = not args.no_elimination
    tokenizer = dpc_step._bpe_tokenizer() if args.arch != "tiny" else None
    print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} devices, "
          f"one used)  jax {jax.__version__}")
    print(f"{args.arch} random weights, {args.dtype}, B={args.batch} K={args.top_k}, "
          f"dedupe_text={eliminate} compact_negatives={eliminate}, median of {args.repeats}")
    print(f"measured {args.dtype} matmul throughput ({n}^3): {peak / 1e12:.2f} TFLOP/s",
          flush=True)
    print(f"{'classes':>7} {'attention':>11} {'remat':>5} {'tail':>6} {'compile s':>9} "
          f"{'step ms':>9} {'GFLOP':>9} {'/minimal':>8} {'FLOP util':>9} {'valid neg':>9} "
          f"{'step GiB':>8} {'peak GiB':>8}", flush=True)
    for c, attention, remat, tail in itertools.product(
            [int(x) for x in args.classes.split(",")], attentions, remats,
            args.chunk_tail.split(",")):
        try:
            r = check(args.arch, c, args.batch, args.top_k, args.dtype, attention, remat,
                      args.repeats, eliminate, peak, tokenizer, tail)
        except Exception as e:  # noqa: BLE001  (report and go on with the next combination)
            print(f"{c:>7} {attention:>11} {int(remat):>5} {tail:>6} failed: "
                  f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        print(f"{c:>7} {attention:>11} {int(remat):>5} {tail:>6} {r['compile']:9.1f} "
              f"{r['step'] * 1e3:9.2f} {r['flops'] / 1e9:9.1f} "
              f"{r['flops'] / r['minimal']:7.3f}x {100 * r['util']:8.1f}% "
              f"{r['valid']:>4}/{args.batch * args.top_k:<4} {_gib(r['step_bytes']):>8} "
              f"{_gib(r['peak_bytes']):>8}", flush=True)


if __name__ == "__main__":
    main()
