#!/usr/bin/env python3
"""Build the vm-agent guest image into build/guest/ (`make guest-image`); cached and reproducible.

    python scripts/build_guest_image.py [--out DIR] [--kernel-package linux-image-X-amd64]
                                         [--compression none|lz4] [--force]

See kuasar.vmagent.imagebuild.builder for what goes in. Exit status: 0 built (or up to date),
3 (EXIT_KERNEL_UNAVAILABLE) the kernel package cannot be downloaded here, 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "vm-agent"), str(ROOT / "common")]

from kuasar.vmagent.imagebuild.builder import (  # noqa: E402
    EXIT_KERNEL_UNAVAILABLE,
    BuildError,
    KernelUnavailable,
    Options,
    build,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "guest", help="output directory")
    parser.add_argument("--cache", type=Path, default=None, help="download/unpack cache (default: <out>/cache)")
    parser.add_argument("--kernel-package", default=None,
                        help="Debian kernel package (default: the one linux-image-amd64 depends on)")
    parser.add_argument("--python", type=Path, default=None,
                        help="interpreter for the guest (default: /usr/bin/python3.11, else /usr/bin/python3 >= 3.11)")
    parser.add_argument("--compression", choices=("none", "lz4"), default="none")
    parser.add_argument("--force", action="store_true", help="rebuild even if the inputs did not change")
    parser.add_argument("--python-flags", default="", help="appended to /init's -SE (e.g. Ximporttime)")
    args = parser.parse_args()
    try:
        build(Options(out_dir=args.out, cache_dir=args.cache, kernel_package=args.kernel_package,
                      python=args.python, compression=args.compression, force=args.force,
                      python_flags=args.python_flags))
    except BuildError as err:
        print(f"guest-image: ERROR: {err}", file=sys.stderr)
        return EXIT_KERNEL_UNAVAILABLE if isinstance(err, KernelUnavailable) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
