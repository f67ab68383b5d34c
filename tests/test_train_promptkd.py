"""PromptKD through the trainer on the embedded world (tiny schedules): the teacher trained with
dpc_jax's PromptSRC on the shipped world_teacher CLIP, the label-free stage 1 on all classes,
PromptKD+DPC with new classes exactly PromptKD's, BatchNorm state across an interrupted run,
eval mode, and the PyTorch teacher and student files imported back."""

import os
import shutil

import numpy as np
import pytest

from dpc_jax.convert.load import load_clip_and_tokenizer, load_clip_from_config
from dpc_jax.data import world
from dpc_jax.training import checkpoints, train_lib
from helpers import REPO, Interrupted, interrupt_after, tree_equal
from helpers import small_config as train_small_config

CONFIG = os.path.join(REPO, "configs", "dpc_promptkd.py")


def small_config(**changes):
    c = train_small_config(CONFIG)
    c.backbone.epochs = 1
    c.backbone.batch_size = 64  # 2048 unlabeled images: 32 steps
    c.backbone.teacher.epochs = 1
    c.backbone.teacher.batch_size = 16
    c.checkpoint_every_steps = 8
    c.log_every_steps = 8
    c.update_from_flattened_dict(changes)
    return c


def restore_final(stage_dir):
    import orbax.checkpoint as ocp

    meta = checkpoints.read_stage_meta(stage_dir)
    mngr = checkpoints.checkpoint_manager(os.path.join(stage_dir, "checkpoints"))
    out = mngr.restore(meta["final_step"], args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), aux=ocp.args.StandardRestore()))
    return out["params"], out["aux"]["state"]


def export_teacher(workdir, run_dir):
    """The run's trained teacher (its GPA sum) as a PromptSRC file in the upstream layout."""
    import orbax.checkpoint as ocp

    from dpc_jax.prompts.promptsrc import PromptSRC
    from dpc_jax.training import teacher as teacher_lib

    stage = os.path.join(workdir, "seed_1", "teacher", "backbone")
    teacher_params, _ = restore_final(stage)
    extra = checkpoints.checkpoint_manager(os.path.join(stage, "checkpoints")).restore(
        checkpoints.read_stage_meta(stage)["final_step"],
        args=ocp.args.Composite(aux=ocp.args.StandardRestore()))["aux"]["extra"]
    tconfig = teacher_lib.teacher_config(small_config())
    _, _, tok = load_clip_and_tokenizer(small_config())
    teacher = PromptSRC(load_clip_from_config(tconfig.clip)[0], tok, tconfig.backbone)
    teacher_prompt = teacher.final_prompt(teacher_params, extra)  # the GPA sum
    return teacher.export_torch_prompt(teacher_prompt, run_dir, 1)


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("promptkd"))
    return workdir, train_lib.train_and_evaluate(small_config(), workdir)


def test_world_config_and_published_settings():
    c = train_lib.load_config(CONFIG)
    assert c.stages == "zeroshot,teacher,backbone,dpc"
    assert c.backbone.teacher_clip.source == "world_teacher"
    assert (c.backbone.depth_vision, c.backbone.teacher.depth_text,
            c.backbone.teacher.depth_vision) == (3, 3, 4)
    real = train_lib.load_config(CONFIG + ":dataset=dtd,root=/data")
    b = real.backbone
    assert (b.n_ctx_vision, b.depth_vision, b.batch_size, b.lr, b.epochs, b.kd_weight,
            b.temperature) == (4, 9, 8, 0.005, 20, 200.0, 1.0)
    assert train_lib.load_config(CONFIG + ":dataset=oxford_pets,root=/d").backbone.kd_weight == 1000
    t = b.teacher
    assert (b.teacher_clip.source, t.name, t.depth_text, t.depth_vision, t.n_ctx_text) == (
        "ViT-L/14", "promptsrc", 9, 9, 4)
    assert (real.batch_size, real.dhno.top_k, real.dpc.epochs, real.dpc.lr, real.dpc.w_base,
            real.dpc.w_new) == (4, 8, 20, 0.002, 0.2, 0.0)
    assert not any(real.dpc.released.to_dict().values())


def test_stages_teacher_and_new_classes_exactly_promptkds(kd_run):
    workdir, results = kd_run
    assert set(results) == {"zeroshot", "teacher", "backbone", "dpc"}
    assert results["dpc"]["new"] == results["backbone"]["new"]  # w_n = 0: bitwise PromptKD
    assert checkpoints.read_stage_meta(os.path.join(workdir, "seed_1", "teacher", "backbone"))
    meta = checkpoints.read_stage_meta(os.path.join(workdir, "seed_1", "backbone"))
    # Stage 1 ran on the unlabeled training split of all 64 classes: 2048 images, B 64.
    assert meta["steps_per_epoch"] == world.NUM_CLASSES * world.SPLIT_SIZES["train"] // 64
    params, state = restore_final(os.path.join(workdir, "seed_1", "backbone"))
    assert set(params) == {"vision_ctx", "vision_deep", "projector"}
    assert not np.allclose(state["bn"]["mean"], 0) and not np.allclose(state["bn"]["var"], 1)
    # DPC: the student, its projector and the teacher's text branch doubled; P frozen.
    dpc, dpc_state = restore_final(os.path.join(workdir, "seed_1", "dpc"))
    assert set(dpc["parallel"]) == {"vision_ctx", "vision_deep", "projector", "ctx",
                                    "text_deep"}
    assert tree_equal({k: dpc["backbone"][k] for k in params}, params)
    assert tree_equal(dpc_state, state)  # BatchNorm statistics frozen in stage 2
    assert not np.array_equal(dpc["parallel"]["ctx"], dpc["backbone"]["ctx"])  # trained


def test_interrupted_stage_one_resumes_bitwise_batchnorm_included(kd_run, tmp_path):
    workdir, _ = kd_run
    other = str(tmp_path / "resumed")
    # The finished teacher stage is reused (restored, not retrained) from the first run.
    shutil.copytree(os.path.join(workdir, "seed_1", "teacher"),
                    os.path.join(other, "seed_1", "teacher"))
    config = small_config(stages="backbone")
    with pytest.raises(Interrupted):
        train_lib.train_and_evaluate(config, other, hooks=[interrupt_after(12)])
    stage = os.path.join(other, "seed_1", "backbone")
    assert checkpoints.read_stage_meta(stage) is None  # not finished
    train_lib.train_and_evaluate(config, other)
    a = restore_final(os.path.join(workdir, "seed_1", "backbone"))
    b = restore_final(stage)
    assert tree_equal(a, b)


def test_eval_mode_and_pytorch_files_reproduce_the_run(kd_run, tmp_path):
    workdir, results = kd_run
    again = train_lib.train_and_evaluate(small_config(mode="eval"), workdir)
    for stage in results:
        assert again[stage]["base"] == results[stage]["base"], stage
        assert again[stage]["new"] == results[stage]["new"], stage
    # The student in PromptKD's layout (with its BatchNorm statistics), the teacher in
    # PromptSRC's: imported, they give the same accuracies without training anything.
    config = small_config(mode="export")
    student_file = train_lib.export_backbone(config, workdir)[0]
    assert student_file.endswith(os.path.join("VLPromptLearner", "model.pth.tar-1"))
    teacher_file = export_teacher(workdir, str(tmp_path / "teacher"))
    imported = train_lib.train_and_evaluate(
        small_config(stages="teacher,backbone", **{"backbone.init_from": student_file,
                                                  "backbone.teacher.init_from": teacher_file}),
        str(tmp_path / "imported"))
    for stage in ("teacher", "backbone"):
        assert imported[stage]["base"] == results[stage]["base"], stage
        assert imported[stage]["new"] == results[stage]["new"], stage
    assert not os.path.exists(tmp_path / "imported" / "seed_1" / "backbone" / "checkpoints")


def test_exported_dpc_stage_imports_as_dpc_init_from(kd_run, tmp_path):
    """Stage 2 exported in StackSPLE_PromptKD's layout and given back as config.dpc.init_from
    (with the exported student and teacher as its stage-1 files) is evaluated, not trained, and
    gives the run's DPC accuracies; the file's BatchNorm statistics serve the base classes
    only (new classes keep stage 1's, as the released new-class loader does)."""
    from dpc_jax.convert import promptkd_torch

    workdir, results = kd_run
    config = small_config(mode="export")
    assert train_lib.exports_dpc(config)
    dpc_file = train_lib.export_dpc(config, workdir)[0]
    # The student written directly from its checkpoint (export_backbone is tested above).
    student_file = promptkd_torch.export_promptkd_student(
        *restore_final(os.path.join(workdir, "seed_1", "backbone")),
        promptkd_torch.student_checkpoint_path(str(tmp_path / "student"), 1), 1)
    assert dpc_file == os.path.join(workdir, "seed_1", "torch", "dpc", "VLPromptLearner",
                                    "model.pth.tar-1")
    files = {"backbone.init_from": student_file,
             "backbone.teacher.init_from": export_teacher(workdir, str(tmp_path / "teacher")),
             "dpc.init_from": dpc_file}

    import torch

    from dpc_jax.convert.torch_files import write_dassl_checkpoint
    from dpc_jax.mesh import make_mesh, replicate
    from dpc_jax.training import stage2, teacher
    from dpc_jax.training.seed import SeedRun

    state_dict = torch.load(dpc_file, map_location="cpu", weights_only=True)["state_dict"]
    bn = "VPT_image_trans.conv1.1."
    state_dict[bn + "running_mean"] = state_dict[bn + "running_mean"] + 3 * torch.sqrt(
        state_dict[bn + "running_var"])  # stage-2 statistics far from stage 1's
    moved = write_dassl_checkpoint(state_dict, str(tmp_path / "moved" / "model.pth.tar-1"), 1)

    # What train_and_evaluate does for stages='dpc', with one Run for both files (CI time).
    config = small_config(stages="dpc", **files)
    train_lib.check_config(config)
    mesh = make_mesh()
    clip_config, clip_params, tokenizer = load_clip_and_tokenizer(config)
    run = teacher.build_run(config, mesh, clip_config, replicate(clip_params, mesh), tokenizer)
    sr = SeedRun.create(run, 1, str(tmp_path / "imported"))
    train_lib.preflight(sr, ["dpc"], train=True)
    assert stage2.run_dpc(sr, train=True) == results["dpc"]["per_seed"]["1"]
    assert not os.path.exists(tmp_path / "imported" / "seed_1" / "dpc")  # nothing trained
    config.dpc.init_from = moved
    again = stage2.run_dpc(sr, train=True)
    assert again["new"] == results["dpc"]["new"]
    assert again["base"] != results["dpc"]["base"]


def test_streamed_unlabeled_split_gives_the_resident_runs_numbers(kd_run, tmp_path):
    """`config.max_resident_mb` below the split's size: stage 1 decodes every step's images on
    the host by index, in the same epoch order; the result is bitwise the resident run's."""
    workdir, results = kd_run
    other = str(tmp_path / "streamed")
    shutil.copytree(os.path.join(workdir, "seed_1", "teacher"),
                    os.path.join(other, "seed_1", "teacher"))
    streamed = train_lib.train_and_evaluate(small_config(stages="backbone", max_resident_mb=0),
                                            other)
    assert streamed["backbone"] == results["backbone"]
    assert tree_equal(restore_final(os.path.join(workdir, "seed_1", "backbone")),
                      restore_final(os.path.join(other, "seed_1", "backbone")))
