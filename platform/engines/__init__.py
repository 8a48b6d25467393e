"""Engines: single process, DDP; DeepSpeed and megatron-core implement the same interface."""

from scaleyard.platform.engines.base import ENGINES, DDPEngine, Engine, make_engine

__all__ = ["ENGINES", "DDPEngine", "Engine", "make_engine"]
