"""Optional behaviour a learner opts into by inheriting a capability class, each defined here once.

- `Stateful`: non-trainable mutable state (BatchNorm statistics), threaded through the stage-1
  step, averaged over devices, checkpointed, frozen in DPC's stage 2.
- `EpochHooks`: host code after every stage-1 epoch with a carried, checkpointed `extra`, and
  stage 1's result computed from it (a prompt aggregate).
- `Distils`: the learner distils from a teacher learner on its own CLIP; the trainer builds the
  teacher from `config.backbone.teacher` and `teacher_clip`, trains or loads its prompt per seed
  and hands it over in `LearnerContext.teacher`.
- `Dual`: DPC's stage 2 runs on the learner; its hooks say which leaves are doubled, how P is
  held, what DHNO scores with.
- `TorchFormat`, `TorchDPCFormat`: PyTorch checkpoints of the released code, read and written.

The functions below are what the trainer calls: they give a learner's capability or the
behaviour of a learner without it (no state, no epoch hooks), or refuse with a message naming
the config field when the capability is needed and absent.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Tuple

import jax

from dpc_jax.models.clip import cosine_logits, logit_scale
from dpc_jax.prompts.base import Array, DualRules, Prompt, PromptLearner, State


class Stateful:
    """Non-trainable mutable state (a pytree), e.g. BatchNorm's running statistics."""

    def init_state(self, clip_params) -> State:
        """Initial state (a pytree)."""
        raise NotImplementedError


class EpochHooks:
    """Host code after each stage-1 epoch; its carried `extra` is checkpointed with the stage."""

    def init_extra(self, prompt: Prompt) -> dict:
        """What `on_epoch_end` carries between epochs."""
        return {}

    def on_epoch_end(self, epoch: int, epochs: int, prompt: Prompt, extra: dict) -> dict:
        """Called on the host after each stage-1 epoch (0-based); returns the new `extra`."""
        return extra

    def final_prompt(self, prompt: Prompt, extra: dict) -> Prompt:
        """Stage 1's result P from the last parameters (e.g. a prompt aggregate)."""
        return prompt


class Distils:
    """The learner distils from a teacher learner (constructor argument `teacher=`), whose
    learner config and CLIP are `config.backbone.<teacher_fields>`."""

    teacher_fields: ClassVar[Tuple[str, str]] = ("teacher", "teacher_clip")


class Dual:
    """DPC's stage 2 runs on this learner; every hook has a default that suits CoOp.

    Class attributes:
    - dpc_unsupported: '' when DPC runs; otherwise why not (a subclass of a dual learner that
      cannot take it; the trainer refuses the 'dpc' stage before anything trains).
    - augment_negatives: DHNO's negative images get the training augmentation (True) or the
      test transform (False).
    """

    dpc_unsupported: ClassVar[str] = ""
    augment_negatives: ClassVar[bool] = True

    def dual_rules(self) -> DualRules:
        """Which leaves DPC doubles and which get the converse map (default: double every leaf,
        converse map on `ctx`)."""
        return DualRules()

    def dpc_backbone(self, prompt: Prompt, consts: dict) -> Prompt:
        """The stage-1 prompt P as DPC's stage 2 holds it (default: the prompt itself)."""
        return prompt

    def check_dpc_config(self, dpc_config) -> None:
        """Raise, naming the field, on `config.dpc` options this learner reads and cannot use
        (run before anything trains)."""

    def dpc_init(self, params: dict, dpc_config, key: jax.Array) -> dict:
        """DPC's initial {'backbone', 'parallel'} after cloning (a learner may reproduce a
        released initialisation here). Default: unchanged."""
        return params

    def scorer_prompt(self, backbone: Prompt, dpc_config, consts: dict) -> Prompt:
        """The prompt whose classifier over the base classes is DHNO's scorer (default P)."""
        return backbone

    def scorer_image_features(self, clip_params, backbone: Prompt, images: Array, state,
                              consts: dict) -> Array:
        """Image features of DHNO's scorer on the anchors (default: the frozen stage-1 model).
        Used only when `uses_image_prompts`."""
        return self.image_features(clip_params, backbone, images, state)

    def pair_logits(self, clip_params, prompt: Prompt, image_features: Array,
                    slot_classifier: Array, consts: Optional[dict] = None) -> Array:
        """Logits [M, M] of slot images against the texts of the slot labels (DHNO's enlarged
        batch): `slot_classifier` [M, E] holds the unit-norm text feature of each slot's label.
        The scale multiplies the cosines after the matmul, as the released contrastive loss
        computes them (stage 1's `classify` scales the image side, as CoOp does)."""
        return logit_scale(clip_params) * cosine_logits(
            image_features, slot_classifier, 1.0, self.clip_config.matmul_precision)

    def pair_loss(self, clip_params, prompt: Prompt, image_features: Array,
                  slot_classifier: Array, valid: Array, consts: Optional[dict], infonce):
        """Stage 2's loss over DHNO's slots; `infonce(logits [M, M], valid [M])` is the
        trainer's symmetric InfoNCE. Default: InfoNCE of `pair_logits` (a learner with several
        heads may combine one InfoNCE per head)."""
        return infonce(self.pair_logits(clip_params, prompt, image_features, slot_classifier,
                                        consts), valid)


class TorchFormat:
    """Stage-1 prompts in the released PyTorch code's checkpoint layout.

    torch_layout: the key layout of the learner's prompt in released files ('coop', 'cocoop',
    'ivlp', 'maple'), which DePT's converter reads and writes for an inner learner.
    """

    torch_layout: ClassVar[str] = ""

    def load_torch_prompt(self, path: str, num_classes: Optional[int] = None) -> Prompt:
        """The stage-1 prompt of a checkpoint written by the released PyTorch code."""
        raise NotImplementedError

    def load_torch_backbone(self, path: str, num_classes: Optional[int] = None):
        """(prompt, state) of a PyTorch stage-1 checkpoint, read once; state None: the file
        holds none (the learner's initial state serves)."""
        return self.load_torch_prompt(path, num_classes), None

    def export_torch_prompt(self, prompt: Prompt, run_dir: str, epoch: int,
                            state: Optional[State] = None) -> str:
        """Write a stage-1 prompt (and the learner's state) as the released PyTorch code saves
        it under `run_dir` (its output folder); returns the file's path."""
        raise NotImplementedError


class TorchDPCFormat(TorchFormat):
    """DPC stage-2 checkpoints of a released DPC trainer (`torch_dpc_trainer`)."""

    torch_dpc_trainer: ClassVar[str] = ""

    def load_torch_dpc(self, path: str):
        """(parallel, state) of a released stage-2 checkpoint: reference mode's parallel prompt
        and the learner state its base classes are evaluated with (None: the stage-1 state)."""
        raise NotImplementedError

    def export_torch_dpc(self, parallel: Prompt, state, run_dir: str, epoch: int) -> str:
        """Write reference mode's parallel prompt (and the state its base classes use) as the
        released DPC trainer saves it under `run_dir`; returns the file's path."""
        raise NotImplementedError


# -- what the trainer calls ----------------------------------------------------------------------

def init_state(learner: PromptLearner, clip_params) -> State:
    return learner.init_state(clip_params) if isinstance(learner, Stateful) else {}


_NO_HOOKS = EpochHooks()


def epoch_hooks(learner: PromptLearner) -> EpochHooks:
    """The learner's epoch hooks, or hooks that carry nothing and keep the last prompt."""
    return learner if isinstance(learner, EpochHooks) else _NO_HOOKS


def distils(learner_or_class: Any) -> bool:
    cls = learner_or_class if isinstance(learner_or_class, type) else type(learner_or_class)
    return issubclass(cls, Distils)


def dpc_unsupported(learner_or_class: Any) -> str:
    """'' when DPC's stage 2 runs on the learner; otherwise why not."""
    cls = learner_or_class if isinstance(learner_or_class, type) else type(learner_or_class)
    reason = getattr(cls, "dpc_unsupported", "")
    if reason:
        return reason
    if not issubclass(cls, Dual):
        return ("it does not declare DPC's hooks (dpc_jax.prompts.capabilities.Dual; a learner "
                "whose hook defaults fit inherits Dual)")
    return ""


def dual(learner: PromptLearner) -> Dual:
    """The learner as DPC sees it; refuses a learner DPC cannot run on."""
    reason = dpc_unsupported(learner)
    if reason:
        raise ValueError(f"config.backbone.name={learner.name!r}: DPC's stage 2 does not run on "
                         f"this learner: {reason}")
    return learner


def torch_format(learner: PromptLearner, field: str = "config.backbone.init_from"
                 ) -> TorchFormat:
    """The learner's PyTorch stage-1 format; refuses, naming `field`, a learner without one."""
    if not isinstance(learner, TorchFormat):
        raise ValueError(f"{field}: the {learner.name!r} learner has no PyTorch checkpoint "
                         f"format (dpc_jax.prompts.capabilities.TorchFormat); train stage 1 here "
                         f"and leave {field} empty")
    return learner


def torch_dpc_trainer(learner_or_class: Any) -> str:
    """The released DPC trainer whose stage-2 files the learner reads and writes ('': none)."""
    cls = learner_or_class if isinstance(learner_or_class, type) else type(learner_or_class)
    return cls.torch_dpc_trainer if issubclass(cls, TorchDPCFormat) else ""


def torch_dpc_format(learner: PromptLearner, field: str = "config.dpc.init_from"
                     ) -> TorchDPCFormat:
    """The learner's released DPC stage-2 format; refuses, naming `field`, a learner without."""
    if not torch_dpc_trainer(learner):
        raise ValueError(f"{field}: the {learner.name!r} learner has no PyTorch format of DPC "
                         f"stage-2 checkpoints (no released DPC trainer for it); leave {field} "
                         f"empty and train stage 2 here")
    return learner
