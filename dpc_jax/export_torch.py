"""`python -m dpc_jax.export_torch --config configs/dpc_ivlp.py --workdir W`.

Writes the stage-1 prompt that `python -m dpc_jax.train` trained in W (same config and
overrides) as the released PyTorch code saves it, one file per seed:
W/seed_N/torch/VLPromptLearner/model.pth.tar-E (IVLP) or .../MultiModalPromptLearner/... (MaPLe),
E = config.backbone.epochs. The upstream trainers load it with `--model-dir W/seed_N/torch
--load-epoch E` (prompt keys only; their frozen CLIP weights stay their own). Needs torch.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dpc_jax.training import train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's directory")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    train_lib.export_backbone(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
