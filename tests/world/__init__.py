"""Tests of the offline procedural character world (idcraft.world)."""
