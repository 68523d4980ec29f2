"""Data: the synthetic world of aligned modalities and the shard format."""
from .shards import ShardError, read_manifest, read_sample, write_synthetic
from .synthetic import boxes_to_text, caption, make_sample, render, sample_scene, text_to_boxes

__all__ = ["ShardError", "read_manifest", "read_sample", "write_synthetic", "boxes_to_text", "text_to_boxes",
           "caption", "make_sample", "render", "sample_scene"]
