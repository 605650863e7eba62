"""Sharded checkpoints (save / resume at any world size) and Hugging Face export."""

from .consolidate import consolidate, save_pretrained
from .format import CheckpointError
from .sharded import load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "consolidate", "load_checkpoint", "save_checkpoint", "save_pretrained"]
