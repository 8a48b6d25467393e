"""Engines: single process, DDP, DeepSpeed ZeRO, megatron-core tensor parallelism (one interface)."""

from scaleyard.platform.engines.base import (
    DDPEngine,
    Engine,
    check_engine,
    data_world_size,
    engine_class,
    make_engine,
)

__all__ = ["DDPEngine", "Engine", "check_engine", "data_world_size", "engine_class", "make_engine"]
