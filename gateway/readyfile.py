"""The ready-file handshake between a tfshield server and whoever started it.

A server started with ``--ready-file PATH`` binds its ports (0 = ephemeral),
then writes ``{"pid": ..., "<name>_port": ...}`` to PATH atomically (write to a
temporary file, then rename), so a reader never sees half a file. Tests and
benchmarks wait for the file instead of guessing ports or sleeping.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_ready_file(path: str | os.PathLike[str], **ports: int | str) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **ports}))
    os.replace(tmp, target)
