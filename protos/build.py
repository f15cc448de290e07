"""Generate the Python modules for the ``.proto`` files in this folder.

Usage (from the repository root; needs the ``dev`` extra for grpcio-tools)::

    python -m protos.build            # rewrite protos/*_pb2*.py
    python -m protos.build --check    # exit 1 if the committed files are stale

Only message modules are generated (``--python_out``): every service is
served and called through generic handlers with method-path strings, so no
generated stubs are needed. The output depends only on the ``.proto`` files and
the grpcio-tools version pinned in pyproject.toml.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto file; return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}"]
    args += [str(p.relative_to(ROOT)) for p in proto_files()]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the message above")
    return sorted((out_dir / "protos").glob("*_pb2.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.build", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp))}
    committed = {p.name: p.read_bytes() for p in PROTO_DIR.glob("*_pb2.py")}
    if args.check:
        stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
        if stale:
            print("stale generated protos: " + ", ".join(stale) + "; run: python -m protos.build")
            return 1
        print(f"{len(fresh)} generated modules up to date")
        return 0
    for name in committed.keys() - fresh.keys():
        (PROTO_DIR / name).unlink()
    for name, data in fresh.items():
        (PROTO_DIR / name).write_bytes(data)
    print(f"wrote {len(fresh)} modules to {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
