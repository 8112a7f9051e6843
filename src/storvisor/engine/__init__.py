"""Pools, backing devices, thin volumes, snapshots, clones and their metadata. No sockets.

Entry points: ``storvisor.engine.home.Home`` (the state directory and its pools),
``storvisor.engine.pool.Pool`` and ``storvisor.engine.volume.Volume`` (a ``BlockDevice``).
``docs/engine.md`` describes the on-disk format and the durability contract.
"""
