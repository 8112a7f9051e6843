"""virtio for back-ends: guest memory, split virtqueues and the virtio-blk device model.

``memory`` translates guest addresses into views of mapped guest RAM, ``ring`` pops
descriptor chains and pushes used entries, ``blk`` parses and executes virtio-blk requests
against a ``BlockDevice``. No I/O happens here beyond calls on objects passed in.
"""
