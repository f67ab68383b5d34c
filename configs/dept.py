"""DePT around a backbone: `--config configs/dept.py:backbone=maple`
(docs/reference/backbones.md#dept).

The inner learner and its settings are those of `configs/dpc_<backbone>.py` (`configs/cocoop.py`
for CoCoOp, which has no DPC config), so on the world DePT wraps exactly the learner its baseline
row trains, with that row's schedule, plus DePT's head: FiLM scale/bias on image and text
features and a linear head over the base classes at 6.5x the prompt's learning rate; loss
0.3 * the inner loss + 0.7 * the head's CE; base classes 0.3 * cos + 0.7 * head logits, new
classes cos logits only. On a real dataset DePT's released settings: CoOp (16 random context
tokens) and MaPLe 10 epochs, B 4, LR 0.0035; CoCoOp 10 epochs, B 1, LR 0.002 (its own config's);
IVLP and PromptSRC (DePT never released them) keep their own. Stages zero-shot and backbone: DPC
on a DePT stage 1 is refused (see `dpc_jax.prompts.dept`).

Arguments (comma-separated key=value): backbone (coop | cocoop | ivlp | maple | promptsrc; default
coop), dataset, root, source, clip.
"""

import importlib.util
import os

import ml_collections

from dpc_jax.configs import common
from dpc_jax.evaluation import protocols
from dpc_jax.prompts.dept import DePT, inner_learners

_NOT_INNER = ("epochs", "lr", "batch_size", "init_from")


def _backbone_config(name, arg):
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, f"dpc_{name}.py")
    if not os.path.isfile(path):  # CoCoOp has no DPC config: its own
        path = os.path.join(here, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"dpc_jax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    args = common.parse_arguments(arg)
    name = args.pop("backbone", "coop")
    wrappable = inner_learners()
    if name not in wrappable:
        raise ValueError(f"config argument backbone={name!r}; DePT wraps one of {wrappable}")
    c = _backbone_config(name, ",".join(f"{k}={v}" for k, v in args.items()))
    c.stages = "zeroshot,backbone"
    inner = c.backbone
    b = DePT.default_config()
    b.inner = ml_collections.ConfigDict(
        {k: v for k, v in inner.to_dict().items() if k not in _NOT_INNER})
    b.epochs, b.lr, b.batch_size, b.init_from = inner.epochs, inner.lr, inner.batch_size, ""
    if not protocols.is_world(c.dataset) and name in ("coop", "maple"):
        b.epochs, b.batch_size, b.lr = 10, 4, 0.0035
        if name == "coop":
            b.inner.n_ctx, b.inner.ctx_init = 16, ""
    c.backbone = b
    return c
