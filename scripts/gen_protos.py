#!/usr/bin/env python3
"""Generate Python stubs from common/protos into kuasar.common.api, reproducibly.

protoc emits absolute imports (`from containerd.types import mount_pb2`); we rewrite them to live
under `kuasar.common.api` so the generated tree never shadows other distributions' top-level
packages (`google.rpc` from googleapis-common-protos, for one). Well-known types
(`google.protobuf.*`) keep coming from the protobuf runtime.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "common" / "protos"
OUT = ROOT / "common" / "kuasar" / "common" / "api"
STAMP = OUT / ".stamp"
PACKAGE = "kuasar.common.api"
IMPORT_RE = re.compile(r"^(from|import) ((?!google\.protobuf)[a-z_][\w.]*)( import [\w, ]+)?", re.M)


def _sources() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def _digest(sources: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    for path in sources:
        h.update(str(path.relative_to(PROTO_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _rewrite(text: str, top_levels: set[str]) -> str:
    def fix(match: re.Match[str]) -> str:
        kind, module, rest = match.group(1), match.group(2), match.group(3) or ""
        if module.split(".")[0] not in top_levels:
            return match.group(0)
        return f"{kind} {PACKAGE}.{module}{rest}"

    return IMPORT_RE.sub(fix, text)


def main() -> int:
    sources = _sources()
    digest = _digest(sources)
    if STAMP.exists() and STAMP.read_text() == digest and "--force" not in sys.argv:
        return 0
    from grpc_tools import protoc  # dev dependency: only needed to (re)generate

    for old in OUT.rglob("*_pb2*.py"):
        old.unlink()
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={OUT}", f"--pyi_out={OUT}", f"--grpc_python_out={OUT}"]
    args += [str(p.relative_to(PROTO_ROOT)) for p in sources]
    if protoc.main(args) != 0:
        print("gen_protos: protoc failed", file=sys.stderr)
        return 1
    top_levels = {p.relative_to(PROTO_ROOT).parts[0] for p in sources}
    # .py and .pyi only: an earlier import may have left compiled files in __pycache__.
    for generated in sorted(p for p in OUT.rglob("*_pb2*.py*") if p.suffix in (".py", ".pyi")):
        generated.write_text(_rewrite(generated.read_text(), top_levels))
    for directory in sorted({p.parent for p in OUT.rglob("*_pb2*.py")}):
        while directory != OUT:
            init = directory / "__init__.py"
            if not init.exists():
                init.write_text("")
            directory = directory.parent
    STAMP.write_text(digest)
    print(f"gen_protos: generated stubs for {len(sources)} proto files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
