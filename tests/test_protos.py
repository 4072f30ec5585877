"""Generated stubs must be exactly what scripts/gen_protos.py makes from protos/ (run `make protos`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "service" / "_proto"


def _stub_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    }


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                   check=True, timeout=120, capture_output=True)
    fresh, committed = _stub_files(tmp_path), _stub_files(COMMITTED)
    assert "editserve/v1/editserve_pb2_grpc.py" in fresh
    assert sorted(fresh) == sorted(committed), "stub files differ: run `make protos`"
    drifted = [name for name in fresh if fresh[name] != committed[name]]
    assert not drifted, f"stale generated stubs {drifted}: run `make protos` and commit service/_proto"


def test_api_names_clients_rely_on() -> None:
    from service._proto.editserve.v1 import editserve_pb2 as pb

    services = {name: [m.name for m in s.methods] for name, s in pb.DESCRIPTOR.services_by_name.items()}
    assert services == {
        "GenerateService": ["Generate", "GenerateStream", "Score"],
        "EditService": ["Edit", "BatchEdit", "GetEdit", "ListEdits", "Rollback", "RollbackTo"],
        "InfoService": ["GetServerInfo"],
        "LocateService": ["Trace"],
    }
    assert pb.DESCRIPTOR.package == "editserve.v1"
    use_edits = pb.GenerateRequest.DESCRIPTOR.fields_by_name["use_edits"]
    assert use_edits.has_presence  # `optional bool`: unset must be distinguishable from false
