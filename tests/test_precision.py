"""Every matmul of both training steps runs at the configured precision: the jaxpr of the
mapped step is inspected for its dot_general / conv precisions (on GPU and TPU the platform
default would be TF32 or bf16 passes)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpc_jax.data.train_sets import build_class_table
from dpc_jax.mesh import make_mesh
from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.models.tokenizer import Tokenizer
from dpc_jax.prompts import CoOp, DualPrompt
from dpc_jax.training import objectives, optim, step
from dpc_jax.training.masks import trainable_mask

from helpers import is_highest, precisions, random_clip_params

def step_jaxpr(stage: str, tiny_config, precision: str):
    config = tiny_config.replace(precision=precision)
    clip_params = random_clip_params(config)
    tok = Tokenizer.from_pretrained(asset_dir(), context_length=77)
    learner = CoOp(config, tok, CoOp.default_config())
    names = ["red circle", "blue star", "pink ring", "green cross", "cyan square"]
    texts = learner.prepare(clip_params, names)
    labels = np.repeat(np.arange(5, dtype=np.int32), 2)
    table, counts = build_class_table(labels, 5)
    prompt = learner.init(jax.random.key(0), clip_params)
    consts = {"clip": clip_params, "class_texts": texts, "learner": {},
              "train": {"images": jnp.zeros((10, 32, 32, 3), jnp.uint8), "labels": labels,
                        "class_table": table, "class_counts": counts}}
    if stage == "backbone":
        params = prompt
        objective = objectives.backbone_objective(learner, 32)
        mask = trainable_mask(params, [(".*", True)])
    else:
        dual = DualPrompt(ml_collections.ConfigDict(dict(mode="reference", w_base=0.5,
                                                         w_new=0.0)), learner.dual_rules())
        params = dual.init(prompt)
        consts["scorer"] = jnp.zeros((5, config.embed_dim))
        objective = objectives.dpc_objective(learner, dual, 32, 3, "reference")
        mask = trainable_mask(params, DualPrompt.trainable_rules())
    tx = optim.make_optimizer(0.002, 2, 2, mask=mask)
    mesh = make_mesh()
    fn = step.map_step(step.make_per_device_step(objective, tx, mask), mesh, donate=False)
    state = {"params": params, "opt_state": tx.init(params), "state": {}}
    batch = {"index": np.arange(2 * mesh.size, dtype=np.int32)}
    return jax.make_jaxpr(fn)(state, consts, batch, jax.random.key(1))


@pytest.mark.parametrize("stage", ["backbone", "dpc"])
def test_every_matmul_of_the_step_is_highest(stage, tiny_config):
    found = precisions(step_jaxpr(stage, tiny_config, "highest"))
    # Both towers, the logits and (stage 2) the scorer and slot logits: many matmuls.
    assert len(found) >= 20, found
    assert [f for f in found if not is_highest(f[1])] == []


def test_the_step_follows_the_configured_precision(tiny_config):
    found = precisions(step_jaxpr("dpc", tiny_config, "default"))
    # The augmentation's resampling matmuls are exact integer-valued work pinned at highest;
    # every model and logit matmul follows config.clip.precision.
    model = [f for f in found if not is_highest(f[1])]
    assert len(model) >= 20
    assert all(p in (None, jax.lax.Precision.DEFAULT,
                     (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)) for _, p in model)
