"""Generate the Python gRPC stubs from protos/ into service/_proto (one command: `make protos`).

Usage: python scripts/gen_protos.py [--out DIR]
The output is deterministic, so tests/test_protos.py can regenerate into a temporary
folder and fail when the committed stubs drift from protos/.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "service" / "_proto"
PACKAGE_PREFIX = "service._proto"


def generate(out_dir: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # imported late: only needed at generation time

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written: list[Path] = []
    for path in sorted(out_dir.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        # protoc writes absolute imports rooted at protos/; make them package-relative.
        text = re.sub(r"^from editserve\.", f"from {PACKAGE_PREFIX}.editserve.", text, flags=re.M)
        path.write_text(text)
        written.append(path)
    for pkg in {p.parent for p in written} | {out_dir}:
        cur = pkg
        while cur != out_dir.parent:
            init = cur / "__init__.py"
            if not init.exists():
                init.write_text("")
            cur = cur.parent
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    files = generate(args.out)
    print(f"generated {len(files)} files under {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
