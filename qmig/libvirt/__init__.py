"""libvirt's QEMU save images (``virsh save``, ``virsh managedsave``): a header, the domain XML,
then QEMU's migration stream, raw or compressed. The layout is ``formats/libvirt-save.toml``.

``detect`` is all a command needs to tell an image from a bare stream (cheap to import);
``image`` reads the header and XML, ``streams`` the QEMU stream inside.
"""
