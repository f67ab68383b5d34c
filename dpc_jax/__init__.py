"""dpc_jax: DPC (Dual-Prompt Collaboration, CVPR 2025) for CLIP prompt tuning in JAX/Flax."""

import logging as _logging

__version__ = "0.1.0"


class _NoTorchNotice(_logging.Filter):
    """transformers announces "PyTorch was not found" on import when torch is absent; dpc_jax
    uses only its tokenizers and configs (torch is an optional extra), so a JAX-only run does
    not show it."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "PyTorch was not found" not in record.getMessage()


_logging.getLogger("transformers").addFilter(_NoTorchNotice())
