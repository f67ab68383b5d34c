"""The host input pipeline. The streamed training set (`train_sets.StreamSource`, PromptKD's
unlabeled split when it is too large to hold on device) decodes the next batches while the
consumer holds the current one, gives the same batches as decoding each image in turn, and hands
a producer's error to the consumer. And benchmarks/input_pipeline.py: its FLOP count, its figures'
arithmetic and its refusals."""

import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from dpc_jax.data import base, train_sets
from dpc_jax.data.transforms import FileImageSplit, ImageLoadError, iterate_batches
from helpers import load_benchmark

SIZE, BATCH = 12, 4


def _split(tmp_path, n=14):
    rng = np.random.default_rng(0)
    shapes = [(40, 30), (30, 41), (33, 33), (57, 20)]
    names = []
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.jpg", quality=90)
        names.append(f"{i}.jpg")
    return FileImageSplit(str(tmp_path), names, [i % 3 for i in range(n)])


class Recording(base.ImageSplit):
    """A split that records which images have been decoded and can fail on chosen ones."""

    def __init__(self, inner, fail=(), error=ImageLoadError):
        self.inner, self.fail, self.error = inner, set(fail), error
        self.done, self.lock = set(), threading.Lock()

    @property
    def labels(self):
        return self.inner.labels

    def describe(self, index):
        return self.inner.describe(index)

    def load_image(self, index, size):
        if index in self.fail:
            if self.error is ImageLoadError:
                raise ImageLoadError(self.describe(index), "broken on purpose")
            raise self.error(f"bug at image {index}")
        image = self.inner.load_image(index, size)
        with self.lock:
            self.done.add(index)
        return image


def _wait_for(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_streamed_batches_equal_sequential_decode(tmp_path):
    split = _split(tmp_path)
    order = np.random.default_rng(1).permutation(len(split))[:12]
    expected = np.stack([split.load_image(int(i), SIZE) for i in order])
    for threads in (1, 3):
        source = train_sets.StreamSource(split, SIZE, threads, False)
        batches = list(source.batches(order, BATCH))
        assert len(batches) == 3 and all(b.shape == (BATCH, SIZE, SIZE, 3) for b in batches)
        np.testing.assert_array_equal(np.concatenate(batches), expected)
    # How far the loader decodes ahead does not change what it yields.
    view = split.subset(order)
    for prefetch in (1, 2, 5):
        got = [b for b, _, _ in iterate_batches(view, SIZE, BATCH, num_threads=3,
                                                progress=False, prefetch=prefetch)]
        np.testing.assert_array_equal(np.concatenate(got), expected)


def test_next_batch_is_decoded_while_the_consumer_holds_this_one(tmp_path):
    split = Recording(_split(tmp_path, n=16))
    batches = train_sets.StreamSource(split, SIZE, 2, False).batches(np.arange(16), BATCH)
    first = next(batches)
    assert first.shape == (BATCH, SIZE, SIZE, 3)
    # The consumer has not asked for batch 1: it and batch 2 are decoded in the background
    # anyway (the loader's default window, 2 batches beyond the one handed out)...
    ahead = set(range(BATCH, 3 * BATCH))
    assert _wait_for(lambda: ahead <= split.done), sorted(split.done)
    # ...and nothing further.
    time.sleep(0.2)
    assert not split.done & set(range(3 * BATCH, 4 * BATCH)), sorted(split.done)
    batches.close()


@pytest.mark.parametrize("skip_bad", [False, True])
def test_producer_error_reaches_the_consumer(tmp_path, skip_bad):
    # An unreadable image raises at its batch unless skip_bad; any other exception (a bug in a
    # decoder) always does, with its own type, and the batches before it arrive intact.
    for error in (ImageLoadError, RuntimeError):
        split = Recording(_split(tmp_path), fail={9}, error=error)
        before = threading.active_count()
        batches = train_sets.StreamSource(split, SIZE, 3, skip_bad).batches(np.arange(12), BATCH)
        got = [next(batches), next(batches)]
        np.testing.assert_array_equal(got[1][0], split.inner.load_image(4, SIZE))
        if skip_bad and error is ImageLoadError:
            third = next(batches)
            assert not third[1].any() and third[0].any()  # image 9 is the zero slot
            continue
        with pytest.raises(error, match="9"):
            next(batches)
        with pytest.raises(StopIteration):
            next(batches)
        # The loader's threads are gone once the error has been raised.
        assert _wait_for(lambda: threading.active_count() <= before)



def test_vit_b16_flops_match_the_published_count():
    # ViT-B/16 at 224: 17.6 G multiply-accumulates (timm's model card: 17.6 GMACs).
    macs = load_benchmark("input_pipeline").vit_macs(224, 16, 768, 12)
    assert abs(macs / 17.6e9 - 1) < 0.01


def test_benchmark_runs_and_its_figures_add_up(tmp_path, capsys):
    bench = load_benchmark("input_pipeline")
    images, out = tmp_path / "jpegs", tmp_path / "out.json"
    args = ["--images", "16", "--repeats", "1", "--threads", "1,2", "--processes",
            "--dir", str(images), "--json", str(out)]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    names = [r["what"] for r in result["rows"]]
    for t in (1, 2):
        for what in ("eval loader", "few-shot decode", f"stream (batch {bench.STREAM_BATCH})"):
            assert f"{what}, {t} thread(s)" in names
    first = [r for r in result["rows"] if r["what"] == "eval loader, 1 thread(s)"][0]
    assert result["host_images_per_s_per_core"] == first["images_per_s"]
    for row in result["projection"]:
        assert row["host_cores"] == pytest.approx(
            row["assumed_images_per_s"] / first["images_per_s"])
    assert result["imagenet_epoch_hours_host"] == pytest.approx(
        bench.IMAGENET_TRAIN / result["stream_images_per_s"] / 3600)
    sizes = {bench.image_size(images / f) for f in os.listdir(images) if f.endswith("jpg")}
    assert sizes <= {s for s, _ in bench.SHAPES}
    # A rerun reuses the images it wrote.
    before = {f: os.path.getmtime(images / f) for f in os.listdir(images)}
    assert bench.main(args[:-2]) == 0
    assert {f: os.path.getmtime(images / f) for f in os.listdir(images)} == before


@pytest.mark.parametrize("args,message", [
    (["--threads", "0"], "--threads '0'; expected a comma list of positive integers"),
    (["--threads", "a"], "--threads 'a'; expected"),
    (["--images", "3"], "--images 3; expected at least 8"),
    (["--mfu", "2"], "--mfu 2.0; expected a fraction"),
    (["--dir", "FOREIGN"], "holds files this benchmark did not write"),
])
def test_benchmark_refuses_bad_input(tmp_path, capsys, args, message):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "photo.jpg").write_bytes(b"mine")
    args = [str(foreign) if a == "FOREIGN" else a for a in args]
    assert load_benchmark("input_pipeline").main(["--repeats", "1", "--processes"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: ") and message in err[0]
    assert (foreign / "photo.jpg").read_bytes() == b"mine"
