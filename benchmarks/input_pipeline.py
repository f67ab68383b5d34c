"""The host input pipeline at ImageNet's image sizes, and how many host cores feed a GPU.

    python benchmarks/input_pipeline.py [--images 300] [--dir DIR] [--threads 1,2]
        [--processes 2] [--repeats 3] [--mfu 0.4] [--json OUT]

Writes --images JPEGs of about ImageNet's typical size (500x375 and its common portrait and
square variants; smooth colour gradients, shapes and Gaussian texture at several scales,
quality 90, so that the files come near ImageNet's size: about 110 kB on average, 140 GB over
1.28M images) under a temporary folder, or DIR (reused on a rerun), and times dpc_jax's own
loaders on them:

- decode: `transforms.read_image` (PIL open + convert('RGB'), Dassl's read_image), per image;
- resize: the bicubic resize of the shorter side to 224 inside `clip_test_transform`, per
  image, and the rest of the transform (centre crop, to uint8 array) separately;
- eval loader: `transforms.iterate_batches` over the split (batch 100, the config's
  eval_batch_size), the evaluation transform at 224, with each thread count;
- few-shot decode: `train_sets.decode_split` (the few-shot set decoded once at stored_size 224);
- stream: `train_sets.StreamSource.batches` (PromptKD's unlabeled set when it is too large to
  hold, batch 8) alone, and beside a consumer that stands in for the device step by sleeping
  as long as one batch takes to decode: with the decode of the next batch overlapped the pair
  takes about one of the two times per batch, without it their sum;
- processes: the same transform in a process pool, to see whether processes beat threads.

Each figure is the median of --repeats passes over all the images. Then it projects the host
cores that keep a GPU fed, from FLOP counts of the models' forward passes (counted here from
the architecture) and an assumed sustained fraction of the GPU's dense bfloat16 peak (both
printed). Not a test: the figures depend on the machine and on whatever else runs on it; each
row says how many cores other processes kept busy while it was measured (Linux).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types

import numpy as np
from PIL import Image, ImageDraw

from dpc_jax import cli
from dpc_jax.data import train_sets, transforms

SIZE = 224  # ViT-B/16's resolution and the configs' stored_size
EVAL_BATCH = 100  # configs' eval_batch_size
STREAM_BATCH = 8  # PromptKD's stage-1 batch
MANIFEST = "input_pipeline_images.json"
# (width, height) of the images written, with weights: ImageNet's most common shapes.
SHAPES = (((500, 375), 5), ((500, 333), 2), ((375, 500), 2), ((500, 500), 1))
IMAGENET_TRAIN = 1_281_167
# Dense bfloat16 tensor peaks from NVIDIA's data sheets (A100 SXM 312, H100 SXM 989 TFLOP/s).
GPUS = (("A100", 312e12), ("H100 SXM", 989e12))


# --- the images -------------------------------------------------------------------------------

def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: a smooth colour field, a few filled shapes, Gaussian texture."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, f1, f2, p = rng.uniform(-1, 1, 5)
        field[..., c] = (128 + 60 * (a * x / width + b * y / height)
                         + 40 * np.sin(2 * np.pi * (f1 * 3 * x / width + f2 * 3 * y / height + p)))
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(image, np.float32)
    for scale in (1, 2, 4, 8):  # texture at several scales, as photos have, not only pixel noise
        noise = rng.normal(0, 12, (3, max(1, height // scale), max(1, width // scale)))
        pixels += np.stack([np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize(
            (width, height), Image.BILINEAR)) for c in noise], -1)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def image_size(path: str) -> tuple:
    with Image.open(path) as image:
        return image.size


def write_images(directory: str, count: int, seed: int) -> list:
    """Write `count` JPEGs into `directory` (or reuse those a previous run wrote there);
    returns their file names."""
    manifest = os.path.join(directory, MANIFEST)
    if os.path.isdir(directory) and os.listdir(directory):
        if not os.path.isfile(manifest):
            raise ValueError(f"--dir {directory} holds files this benchmark did not write; "
                             f"expected an empty or new folder")
        with open(manifest) as f:
            written = json.load(f)
        if written["count"] == count and written["seed"] == seed:
            return written["files"]
        raise ValueError(f"--dir {directory} holds {written['count']} images of seed "
                         f"{written['seed']}; expected {count} of seed {seed} (use another "
                         f"folder)")
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes, weights = zip(*SHAPES)
    p = np.asarray(weights, float) / sum(weights)
    files = []
    for i in range(count):
        width, height = shapes[int(rng.choice(len(shapes), p=p))]
        name = f"{i:05d}.jpg"
        synthetic_photo(rng, width, height).save(os.path.join(directory, name), quality=90)
        files.append(name)
    with open(manifest, "w") as f:
        json.dump({"count": count, "seed": seed, "files": files}, f)
    return files


# --- timing -----------------------------------------------------------------------------------

def busy_cpu_seconds():
    """CPU seconds the whole machine has spent busy since boot (Linux), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Cores that OTHER processes kept busy while the block ran: the machine's busy CPU time
    less this process's own (threads, and process-pool children once reaped), over the wall
    time. On a shared machine it says which figures were taken beside other work."""

    def __enter__(self):
        self.busy, self.own, self.wall = busy_cpu_seconds(), sum(os.times()[:4]), time.time()
        return self

    def __exit__(self, *exc):
        busy = busy_cpu_seconds()
        wall = time.time() - self.wall
        own = sum(os.times()[:4]) - self.own
        self.cores = None if busy is None else max(0.0, (busy - self.busy - own) / wall)
        return False


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_image_parts(split: transforms.FileImageSplit, repeats: int) -> dict:
    """Seconds per image of decode, bicubic resize and the rest of the transform (one thread)."""
    n = len(split)
    decoded = [transforms.read_image(split.path(i)) for i in range(n)]  # warm the page cache
    decode = median_time(lambda: [transforms.read_image(split.path(i)) for i in range(n)],
                         repeats)
    sizes = [transforms.resized_size(im.width, im.height, SIZE) for im in decoded]
    resize = median_time(lambda: [im.resize(s, Image.BICUBIC) for im, s in zip(decoded, sizes)],
                         repeats)
    resized = [im.resize(s, Image.BICUBIC) for im, s in zip(decoded, sizes)]
    crop = median_time(lambda: [transforms.clip_test_transform(im, SIZE) for im in resized],
                       repeats)  # already at size: only the centre crop and the uint8 array
    transform = median_time(lambda: [transforms.clip_test_transform(im, SIZE) for im in decoded],
                            repeats)
    return {"decode": decode / n, "resize": resize / n, "crop_to_array": crop / n,
            "transform": transform / n}


def loader_rate(make, n: int, repeats: int) -> float:
    """Images per second of draining the iterable `make()` returns."""
    return n / median_time(lambda: [None for _ in make()], repeats)


def stream_overlap(split, threads: int, repeats: int) -> dict:
    """StreamSource's batches alone, and beside a consumer that sleeps one batch's decode time
    per batch (a stand-in for the device step)."""
    nb = len(split) // STREAM_BATCH
    indices = np.random.default_rng(0).permutation(len(split))[:nb * STREAM_BATCH]
    source = train_sets.StreamSource(split, SIZE, threads, False)
    alone = median_time(lambda: list(source.batches(indices, STREAM_BATCH)), repeats)
    step = alone / nb

    def with_consumer():
        for _ in source.batches(indices, STREAM_BATCH):
            time.sleep(step)

    paired = median_time(with_consumer, repeats)
    return {"rate": nb * STREAM_BATCH / alone, "step_s": step, "paired_s": paired,
            "serial_s": 2 * alone, "overlapped_s": alone + step}


def process_rate(split, workers: int, repeats: int) -> float:
    """Images per second of the evaluation transform in a pool of `workers` processes (results
    pickled back to the parent, as a process loader must)."""
    n = len(split)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        list(pool.map(split.load_image, range(min(n, 2 * workers)), [SIZE] * min(n, 2 * workers)))
        seconds = median_time(lambda: list(pool.map(split.load_image, range(n), [SIZE] * n,
                                                    chunksize=8)), repeats)
    return n / seconds


# --- the projection ---------------------------------------------------------------------------

def vit_macs(resolution: int, patch: int, width: int, layers: int) -> float:
    """Multiply-accumulates of a ViT image-tower forward (MLP ratio 4; LayerNorms, softmax and
    biases, under 1%, left out)."""
    patches = (resolution // patch) ** 2
    tokens = patches + 1
    per_layer = (tokens * width * 3 * width  # q, k, v
                 + 2 * tokens * tokens * width  # scores and the weighted values
                 + tokens * width * width  # output projection
                 + 2 * tokens * width * 4 * width)  # MLP
    return patches * 3 * patch * patch * width + layers * per_layer


def projection(host_rate_per_core: float, mfu: float) -> list:
    """Rows (work, GFLOP per image, GPU, assumed images/s, host cores needed)."""
    b16 = 2 * vit_macs(224, 16, 768, 12)
    l14 = 2 * vit_macs(224, 14, 1024, 24)
    works = (("evaluation (ViT-B/16 forward)", b16),
             # The frozen teacher's forward, the student's forward and its backward to the
             # prompts (input gradients only: about one more forward).
             ("PromptKD stage 1 (ViT-L/14 teacher + ViT-B/16 student fwd+bwd)", l14 + 2 * b16))
    rows = []
    for work, flops in works:
        for gpu, peak in GPUS:
            rate = mfu * peak / flops
            rows.append({"work": work, "gflop_per_image": flops / 1e9, "gpu": gpu,
                         "assumed_images_per_s": rate,
                         "host_cores": rate / host_rate_per_core})
    return rows


# --- the command ------------------------------------------------------------------------------

def parse_threads(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--threads {text!r}; expected a comma list of positive integers, "
                         f"e.g. 1,2")
    return values


def machine() -> dict:
    load = os.getloadavg()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "load_1_5_15": [round(v, 2) for v in load]}


def run(args) -> dict:
    threads = parse_threads(args.threads)
    for flag, value in (("--images", args.images), ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{flag} {value}; expected a positive integer")
    if args.images < STREAM_BATCH:
        raise ValueError(f"--images {args.images}; expected at least {STREAM_BATCH} (one "
                         f"streamed batch)")
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu}; expected a fraction in (0, 1]")
    directory = args.dir or tempfile.mkdtemp(prefix="dpc_jax_pipeline_")
    try:
        start = machine()
        files = write_images(directory, args.images, args.seed)
        split = transforms.FileImageSplit(directory, files, [0] * len(files))
        n = len(split)
        pixels = [image_size(split.path(i)) for i in range(n)]
        kbytes = [os.path.getsize(split.path(i)) / 1000 for i in range(n)]
        print(f"{n} JPEGs in {directory}: mean {np.mean([w for w, _ in pixels]):.0f}x"
              f"{np.mean([h for _, h in pixels]):.0f} px, mean {np.mean(kbytes):.0f} kB; "
              f"{start['cpus']} CPUs, load {start['load_1_5_15']}, {start['date']}; "
              f"median of {args.repeats}")
        with OtherLoad() as other:
            parts = per_image_parts(split, args.repeats)
        rows = [{"what": f"{k} (1 thread)", "ms_per_image": 1e3 * v, "images_per_s": 1 / v,
                 "other_cores": other.cores} for k, v in parts.items()]
        rates = {}
        for t in threads:
            with OtherLoad() as other:
                rate = loader_rate(lambda: transforms.iterate_batches(
                    split, SIZE, EVAL_BATCH, num_threads=t, progress=False), n, args.repeats)
            rates[t] = rate
            rows.append({"what": f"eval loader, {t} thread(s)", "threads": t,
                         "images_per_s": rate, "ms_per_image": 1e3 / rate,
                         "other_cores": other.cores})
        for t in threads:
            config = types.SimpleNamespace(num_workers=t, progress=False, skip_bad_images=False)
            with OtherLoad() as other:
                seconds = median_time(
                    lambda: train_sets.decode_split(split, SIZE, config, "bench"), args.repeats)
            rows.append({"what": f"few-shot decode, {t} thread(s)", "threads": t,
                         "images_per_s": n / seconds, "ms_per_image": 1e3 * seconds / n,
                         "other_cores": other.cores})
        overlap = {}
        for t in threads:
            with OtherLoad() as other:
                o = stream_overlap(split, t, args.repeats)
            overlap[t] = o
            rows.append({"what": f"stream (batch {STREAM_BATCH}), {t} thread(s)", "threads": t,
                         "images_per_s": o["rate"], "ms_per_image": 1e3 / o["rate"],
                         "other_cores": other.cores})
        for w in args.processes:
            with OtherLoad() as other:
                rate = process_rate(split, w, args.repeats)
            rows.append({"what": f"eval transform, {w} process(es)", "processes": w,
                         "images_per_s": rate, "ms_per_image": 1e3 / rate,
                         "other_cores": other.cores})
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    print()
    print(f"| {'what':<36} | {'ms/image':>9} | {'images/s':>9} | {'other load':>10} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 11}|{'-' * 12}|")
    for r in rows:
        other = "-" if r["other_cores"] is None else f"{r['other_cores']:.2f}"
        print(f"| {r['what']:<36} | {r['ms_per_image']:>9.2f} | {r['images_per_s']:>9.1f} | "
              f"{other:>10} |")
    print("(other load: cores other processes kept busy while the row was measured)")
    print()
    print("stream beside a consumer that sleeps one batch's decode time per batch:")
    for t, o in overlap.items():
        print(f"  {t} thread(s), {1e3 * o['step_s']:.1f} ms per batch: {o['paired_s']:.2f} s; "
              f"overlapped would be {o['overlapped_s']:.2f} s, serial {o['serial_s']:.2f} s")
    per_core = rates[min(rates)] / min(rates)
    scaling = {t: rates[t] / (t * per_core) for t in rates}
    print()
    print("thread scaling of the eval loader (rate / (threads x 1-thread rate)): "
          + ", ".join(f"{t}: {s:.2f}" for t, s in scaling.items()))
    proj = projection(per_core, args.mfu)
    print()
    print(f"projection: GPU images/s = {args.mfu:.0%} of the dense bf16 peak / forward FLOPs "
          f"(FLOPs counted from the architecture); host cores = that / {per_core:.0f} images/s "
          f"per core (the 1-thread eval loader), assuming cores scale linearly")
    print(f"| {'work':<62} | {'GFLOP/img':>9} | {'GPU':<8} | {'img/s':>7} | {'cores':>5} |")
    print(f"|{'-' * 64}|{'-' * 11}|{'-' * 10}|{'-' * 9}|{'-' * 7}|")
    for r in proj:
        print(f"| {r['work']:<62} | {r['gflop_per_image']:>9.1f} | {r['gpu']:<8} | "
              f"{r['assumed_images_per_s']:>7.0f} | {r['host_cores']:>5.1f} |")
    stream_rate = max(o["rate"] for o in overlap.values())
    epoch_h = IMAGENET_TRAIN / stream_rate / 3600
    print()
    print(f"PromptKD's unlabeled ImageNet epoch ({IMAGENET_TRAIN} images) at this machine's best "
          f"stream rate ({stream_rate:.0f} images/s): {epoch_h:.1f} h of host decode per epoch")
    end = machine()
    result = {"start": start, "end": end, "images": n, "seed": args.seed,
              "mean_kbytes": float(np.mean(kbytes)), "repeats": args.repeats,
              "rows": rows, "stream_overlap": {str(t): o for t, o in overlap.items()},
              "thread_scaling": {str(t): s for t, s in scaling.items()},
              "host_images_per_s_per_core": per_core, "mfu": args.mfu, "projection": proj,
              "imagenet_epoch_hours_host": epoch_h, "stream_images_per_s": stream_rate}
    print(f"load at the end: {end['load_1_5_15']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--dir", default="", help="folder for the JPEGs (default: a temporary "
                        "one, removed at the end); reused by a rerun")
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--processes", type=int, nargs="*", default=[2],
                        help="process pool sizes to time the transform in (none: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="assumed sustained fraction of the GPU's dense bf16 peak")
    parser.add_argument("--json", default="", help="write the figures here")
    args = parser.parse_args(argv)
    try:
        result = run(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {args.json}")
    except cli.USER_ERRORS as e:
        return cli.print_error(cli.message(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
