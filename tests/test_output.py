"""Progress output: a tqdm bar on a terminal, a plain line at most every 30 s elsewhere."""

import io

from dpc_jax import progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_a_few_plain_lines_not_a_bar_per_step(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    out = io.StringIO()
    bar = progress.progress_bar(total=1000, desc="seed 1 backbone", stream=out)
    assert isinstance(bar, progress.LineProgress)
    for step in range(1000):  # 1000 steps over 100 s
        clock[0] += 0.1
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 4  # at 30, 60 and 90 s, and the last one
    assert lines[0].startswith("seed 1 backbone: 300/1000 (30%) 30 s, 10 it/s, loss=")
    assert lines[-1].startswith("seed 1 backbone: 1000/1000 (100%) 100 s")


def test_a_terminal_gets_tqdm_and_disabled_prints_nothing():
    from tqdm import tqdm

    bar = progress.progress_bar(total=3, desc="x", stream=FakeTerminal())
    assert isinstance(bar, tqdm)
    bar.close()
    out = io.StringIO()
    off = progress.progress_bar(range(3), total=3, enabled=False, stream=out)
    assert list(off) == [0, 1, 2] and out.getvalue() == ""
    resumed = progress.progress_bar(total=10, initial=4, desc="r", stream=out)
    resumed.close()  # nothing done since the resume: no line
    assert out.getvalue() == ""


def test_transformers_no_torch_notice_is_dropped_and_other_warnings_kept():
    import logging

    import dpc_jax  # noqa: F401  (installs the filter)

    logger = logging.getLogger("transformers")
    make = lambda msg: logger.makeRecord("transformers", logging.WARNING, __file__, 1, msg,
                                         (), None)
    assert not logger.filter(make("PyTorch was not found. Models won't be available and only "
                                  "tokenizers, configuration and file/data utilities can be "
                                  "used."))
    assert logger.filter(make("some other warning"))
