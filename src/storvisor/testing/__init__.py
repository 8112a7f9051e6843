"""storvisor's public test kit: an in-memory device, the block-device conformance suite,
a Python vhost-user front-end and guest-VM helpers. Usable by anyone implementing a layer."""
