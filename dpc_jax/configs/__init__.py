"""Shared config building blocks: `base_to_new` (the protocol's base config) and `common`
(config arguments, dataset keys, per-(dataset, method) settings). The config files users pass
to `--config` live in the repository's `configs/` and are short variants of these."""
