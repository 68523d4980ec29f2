"""Data: the synthetic world of aligned modalities, the shard format, and loaders (torch and DALI)."""
from .loader import TokenShards, build_loader
from .shards import ShardError, read_manifest, read_sample, write_synthetic
from .synthetic import boxes_to_text, caption, make_sample, render, sample_scene, text_to_boxes

__all__ = ["ShardError", "TokenShards", "build_loader", "read_manifest", "read_sample", "write_synthetic",
           "boxes_to_text", "text_to_boxes", "caption", "make_sample", "render", "sample_scene"]
