"""Pools, backing devices, thin volumes, snapshots, clones and their metadata. No sockets."""
