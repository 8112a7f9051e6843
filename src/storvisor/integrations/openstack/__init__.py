"""storvisor for OpenStack: a Cinder volume driver (``cinder.StorvisorDriver``).

``backend`` and ``connection`` import nothing from OpenStack: the options of a back-end, the
client they open, and the ``connection_info`` data the driver returns, typed. ``cinder`` is the
driver itself; it needs the ``openstack`` extra (``pip install storvisor[openstack]``).
"""
