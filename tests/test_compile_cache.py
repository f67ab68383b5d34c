"""config.compilation_cache (dpc_jax/training/compile_cache.py): JAX's persistent compilation
cache in a per-machine subfolder, a directory set by the caller kept, clear errors.

The test session has its own cache directory set (conftest.py), so the cases that start from
no cache run in a fresh interpreter without JAX_COMPILATION_CACHE_DIR."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from dpc_jax.training import compile_cache
from helpers import REPO



def run_python(code: str, **env):
    environ = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    environ.update(env, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_enable_writes_entries_in_a_machine_subfolder_and_a_rerun_loads_them(tmp_path):
    code = f"""
        import jax, jax.numpy as jnp
        from jax._src import monitoring
        from dpc_jax.training import compile_cache
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        hits = []
        monitoring.register_event_listener(
            lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
        print(compile_cache.enable({str(tmp_path / "c")!r}))
        print(compile_cache.machine_key())
        print(float(jax.jit(lambda x: jnp.sin(x) * 3.0 + x)(jnp.float32(2.0))))
        print(len(hits))
        """
    first = run_python(code)
    path, key = first[0], first[1]
    assert path == str(tmp_path / "c" / key)
    assert key.startswith(jax.devices()[0].platform + "-")
    assert os.listdir(path), "no cache entry written"
    assert first[3] == "0"
    second = run_python(code)
    assert second[:3] == first[:3]
    assert int(second[3]) >= 1, "the rerun compiled instead of loading the cache entry"


def test_a_directory_set_by_the_caller_is_kept_and_empty_means_off(tmp_path):
    given = str(tmp_path / "given")
    lines = run_python(f"""
        import jax
        from dpc_jax.training import compile_cache
        print(compile_cache.enable({str(tmp_path / "ours")!r}))
        """, JAX_COMPILATION_CACHE_DIR=given)
    assert lines == [given]
    assert not (tmp_path / "ours").exists()
    lines = run_python("""
        import jax
        from dpc_jax.training import compile_cache
        print(compile_cache.enable(""), jax.config.jax_compilation_cache_dir)
        """)
    assert lines == ["None None"]
    # In this session the suite's own directory is set, and enable() keeps it.
    assert compile_cache.enable(str(tmp_path / "x")) == jax.config.jax_compilation_cache_dir
    assert not (tmp_path / "x").exists()


def test_bad_cache_directory_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    lines = run_python(f"""
        from dpc_jax.training import compile_cache
        for value in ({str(blocker)!r}, 3):
            try:
                compile_cache.enable(value)
            except ValueError as e:
                print(e)
        """)
    assert len(lines) == 2
    assert lines[0].startswith(f"config.compilation_cache={str(blocker)!r}: cannot create")
    assert "writable directory, or ''" in lines[0]
    assert lines[1].startswith("config.compilation_cache=3; expected a directory path")


def test_machine_key_is_a_folder_name():
    key = compile_cache.machine_key()
    assert key == os.path.basename(key) and " " not in key
    assert key == compile_cache.machine_key()
