"""dpc_jax: DPC (Dual-Prompt Collaboration, CVPR 2025) for CLIP prompt tuning in JAX/Flax."""

__version__ = "0.1.0"
