"""CPU time of CLIP encode_image: dpc_jax (jit) next to PyTorch (transformers), same weights.

    python benchmarks/encode_image.py [--batch 32] [--runs 3] [--arch ViT-B/16]

A random transformers CLIPModel of the chosen OpenAI architecture is converted with dpc_jax's
Hugging Face importer; both encode the same random images. JAX is timed after compilation
(compile time reported separately); each figure is the median of --runs runs. Not a test:
numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np


def random_hf_model(config, seed: int):
    """A transformers CLIPModel with seeded random weights (weights N(0, .02), LN scales ~1)."""
    import torch
    import transformers

    from dpc_jax.convert import huggingface_config

    with torch.device("meta"):  # skip the library init: every tensor is filled below
        model = transformers.CLIPModel(transformers.CLIPConfig(**huggingface_config(config)))
    model = model.to_empty(device="cpu").eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():  # only the position_ids buffers
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))
        for name, p in model.named_parameters():
            noise = torch.from_numpy(rng.standard_normal(tuple(p.shape), dtype=np.float32))
            if name == "logit_scale":
                p.fill_(float(np.log(1 / 0.07)))
            elif p.ndim == 1 and name.endswith(".weight"):  # LayerNorm scales
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    return model


def median_seconds(fn, runs: int) -> tuple:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B/16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precision", default="highest", choices=["default", "high", "highest"])
    args = parser.parse_args(argv)

    import torch

    from dpc_jax.convert import from_huggingface_state_dict
    from dpc_jax.models.clip import CLIP, get_config

    config = get_config(args.arch, precision=args.precision)
    print(f"{args.arch}, {args.batch} images, median of {args.runs} runs; jax {jax.__version__} "
          f"on {jax.devices()[0].platform}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; {os.cpu_count()} CPUs visible")
    hf_model = random_hf_model(config, seed=0)
    params = from_huggingface_state_dict(
        {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}, config,
        source="random transformers CLIPModel")
    params = jax.device_put(params)
    res = config.image_resolution
    images = np.random.default_rng(1).standard_normal((args.batch, res, res, 3),
                                                      dtype=np.float32)

    model = CLIP(config)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
    x = jax.device_put(images)
    start = time.perf_counter()
    compiled = encode.lower(params, x).compile()
    compile_s = time.perf_counter() - start
    ours = np.asarray(compiled(params, x))  # warm-up run
    jax_s, jax_all = median_seconds(lambda: compiled(params, x).block_until_ready(), args.runs)

    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = hf_model.get_image_features(pixel_values=pixels)  # warm-up run
        reference = getattr(out, "pooler_output", out).numpy()
        torch_s, torch_all = median_seconds(
            lambda: hf_model.get_image_features(pixel_values=pixels), args.runs)

    err = float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))
    print(f"{'':28s}{'median s':>10s}{'ms/image':>10s}   runs (s)")
    for name, median, runs in ((f"dpc_jax (jit, {args.precision})", jax_s, jax_all),
                               ("PyTorch transformers", torch_s, torch_all)):
        print(f"{name:28s}{median:10.3f}{1000 * median / args.batch:10.1f}   "
              + " ".join(f"{t:.3f}" for t in runs))
    print(f"jax compile: {compile_s:.2f} s; jax / torch time ratio: {jax_s / torch_s:.2f}; "
          f"feature max relative error: {err:.2e}")


if __name__ == "__main__":
    main()
