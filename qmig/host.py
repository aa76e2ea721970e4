"""Facts of the host qmig runs on, from the operating system (never restated as literals)."""

from __future__ import annotations

import mmap

# The host's page size: what mmap, madvise and userfaultfd work in, and what a RAM block
# backed by ordinary memory has as its page size (QEMU's qemu_real_host_page_size()).
HOST_PAGE_SIZE: int = mmap.PAGESIZE
