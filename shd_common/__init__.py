"""The lowest shared layer: what data preparation and training both rely on, importing neither.

- :mod:`shd_common.settings`: typed, validated config sections (pydantic v2), YAML and overrides;
- :mod:`shd_common.integrity`: atomic writes, fsync, sha256 digests, a full disk named;
- :mod:`shd_common.shards`: the Megatron mmap shard format (``.bin``/``.idx``), written and read;
- :mod:`shd_common.manifest`: a data directory's manifest and the tokenizer's identity: the
  on-disk contract between ``data_prep`` (which writes it) and ``pipeline`` (which reads it);
- :mod:`shd_common.safe_remove`: the one place that deletes or moves aside a user-visible directory.
"""
