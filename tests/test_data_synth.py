"""The world stand-in of a CoOp-layout dataset (`python -m dpc_jax.data synth`)."""

import subprocess
import sys

import numpy as np
import pytest

from dpc_jax.data import check, registry, sources, synth, world


def test_stand_in_reads_as_the_dataset(tmp_path):
    folder = synth.write_coop_layout("oxford_pets", str(tmp_path), train=3, val=1, test=2)
    assert folder == str(tmp_path / "oxford_pets")
    report = check.check_dataset("oxford_pets", str(tmp_path), shots=2, seed=1,
                                 verify_images=True)
    assert report["ok"], report
    data, _ = sources.load_dataset("oxford_pets", str(tmp_path), "coop", 2, 1, "all")
    info = registry.get("oxford_pets")
    assert len(data.classnames) == info.num_classes == 37
    assert data.classnames == world.load_world_full().classnames[:37]
    assert len(data.train.labels) == 2 * 37 and len(data.test.labels) == 2 * 37
    # Each test image is the world's test item of its class (JPEG-compressed at 32 pixels).
    split = world.WorldSplit("test", per_class=2)
    for i in (0, 11, 40):
        label = int(data.test.labels[i])
        ours = data.test.load_image(i, 32).astype(np.float32)
        candidates = [split.load_image(label * 2 + k, 32).astype(np.float32) for k in range(2)]
        assert min(np.abs(ours - c).mean() for c in candidates) < 6.0


def test_bad_requests_name_what_is_expected(tmp_path):
    with pytest.raises(ValueError, match=r"imagenet.*split_zhou.*\['dtd', 'oxford_pets'\]"):
        synth.write_coop_layout("imagenet", str(tmp_path))
    with pytest.raises(ValueError, match=r"food101.*101 classes; the world has 64"):
        synth.write_coop_layout("food101", str(tmp_path))
    with pytest.raises(ValueError, match=r"test=0; expected at least 1"):
        synth.write_coop_layout("dtd", str(tmp_path), test=0)
    out = subprocess.run([sys.executable, "-m", "dpc_jax.data", "synth", "--dataset", "eurosat",
                          "--root", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("Error: dataset 'eurosat'")
    assert "Traceback" not in out.stderr


def test_a_folder_holding_other_data_is_refused_and_left_as_it_was(tmp_path):
    """Writing a stand-in where a real dataset sits would replace its split file and mix world
    images into its folders: refused through the CLI, nothing touched. A stand-in's own folder
    can be written again."""
    folder = tmp_path / "oxford_pets"
    (folder / "images").mkdir(parents=True)
    split = folder / "split_zhou_OxfordPets.json"
    split.write_text('{"train": [], "val": [], "test": []}')
    (folder / "images" / "real.jpg").write_bytes(b"real image bytes")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    out = subprocess.run([sys.executable, "-m", "dpc_jax.data", "synth", "--dataset",
                          "oxford_pets", "--root", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("Error:") == 1 and "Traceback" not in out.stderr
    assert "did not write" in out.stderr and "oxford_pets" in out.stderr
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    again = tmp_path / "again"
    synth.write_coop_layout("dtd", str(again), train=1, val=1, test=1)
    synth.write_coop_layout("dtd", str(again), train=2, val=1, test=1)  # its own folder
    assert check.check_dataset("dtd", str(again), shots=2, seed=1)["ok"]


def test_a_class_with_fewer_images_than_shots_is_said_once(tmp_path, capsys):
    """A CoOp-layout dataset whose classes hold fewer training images than `shots` trains on
    what there is; one warning line says so instead of recording the requested shots silently."""
    synth.write_coop_layout("dtd", str(tmp_path), train=3, val=1, test=1)
    data = sources.build_dataset("dtd", str(tmp_path), shots=4, seed=1)
    assert np.bincount(data.train.labels).max() == 3
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "dtd: 47 class(es) have fewer than 4 training images (shots)" in err
    sources.build_dataset("dtd", str(tmp_path), shots=3, seed=1)
    assert "warning" not in capsys.readouterr().err
