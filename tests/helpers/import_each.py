"""Import each module named on the command line in a process of its own; print one JSON line per failure.

Run as ``python import_each.py longtail.a longtail.b ...`` in a fresh interpreter. It first imports the
third-party libraries longtail's modules use (torch, torchvision, numpy, ...), but no longtail module, then forks
one child per module: every child starts with no longtail module loaded, as a fresh interpreter would, without
paying torch's start-up (1-2 s) once per module. What a child can catch is what a fresh interpreter catches about
longtail itself: an import cycle ("partially initialized module"), a module that works only when another one was
imported first, a name imported from the wrong place. Exit status: the number of modules that failed (capped).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

THIRD_PARTY = ("numpy", "yaml", "tqdm", "torch", "torch.distributed", "torch.nn.functional", "torchvision",
               "torchvision.transforms.v2", "torchvision.io")


def main(names: list[str]) -> int:
    for lib in THIRD_PARTY:
        importlib.import_module(lib)
    assert not any(m == "longtail" or m.startswith("longtail.") for m in sys.modules), "longtail imported too early"
    failed = 0
    for name in names:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: import, report, leave without running the parent's cleanup
            os.close(read)
            code, text = 0, ""
            try:
                importlib.import_module(name)
            except BaseException:  # noqa: BLE001  (any failure is the report)
                code, text = 1, traceback.format_exc()
            os.write(write, text.encode())
            os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            text = f.read().decode()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failed += 1
            print(json.dumps({"module": name, "error": text or f"exit status {status}"}))
    return min(failed, 100)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
