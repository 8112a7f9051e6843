"""The libvirtd fixtures of ``tests/libvirt_kit.py``."""

from libvirt_kit import paused_guest, virsh, workdir  # noqa: F401
