"""Trainers of the world's bundled models, one module per model (run in order by ``idcraft world build``).

Each trains on :class:`idcraft.world.arrays.WorldArrays` (renders in memory), writes its model in the
format of its real counterpart, and returns a dict of measurements for the bundle's ``BUILD.json``.
Adapters are not trained here: they go through ``idcraft.training`` like any user's adapter.
"""
