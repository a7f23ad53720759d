"""Import open3d on machines without the system libusb.

open3d links against ``libusb-1.0.so.0``; a bare machine may lack it. The PyPI package
``libusb-package`` ships the library; loading it with RTLD_GLOBAL before ``import open3d`` satisfies
the dependency (LD_LIBRARY_PATH set at run time would not).
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def open3d():
    try:
        import open3d as o3d  # noqa: F401

        return o3d
    except ImportError as first:
        if "libusb" not in str(first):
            raise
    try:
        import libusb_package

        path = libusb_package.get_library_path()
    except Exception as e:  # pragma: no cover - depends on the machine
        raise ImportError("open3d needs libusb-1.0: install the Debian package libusb-1.0-0 "
                          "or the PyPI package libusb-package") from e
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    import open3d as o3d

    return o3d
