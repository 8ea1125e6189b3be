"""The default world: a seeded synthetic knowledge graph, its corpus, pages and verified QA."""

from asearcher_jax.world.config import WorldConfig
from asearcher_jax.world.generator import World, generate_world, verify, walk
from asearcher_jax.world.io import ensure_world, load_world, write_world

__all__ = [
           "World",
           "WorldConfig",
           "ensure_world",
           "generate_world",
           "load_world",
           "verify",
           "walk",
           "write_world",
]
