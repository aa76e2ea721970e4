"""libvirt's QEMU save images (``virsh save``, ``virsh managedsave``): a header, the domain XML,
then QEMU's migration stream, raw or compressed. The layout is ``formats/libvirt-save.toml``.
"""

from qmig.libvirt.image import DomainFacts, SaveImage, is_save_image, read_image
from qmig.libvirt.streams import open_if_save_image, open_stream, relocate

__all__ = [
    "DomainFacts",
    "SaveImage",
    "is_save_image",
    "open_if_save_image",
    "open_stream",
    "read_image",
    "relocate",
]
