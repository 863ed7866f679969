"""Task host: runs inside the job's process (never inside the daemon).

Started as `python -I -B _taskhost.py <task.json>`: imports the task module
from the configured task paths only, calls `run(**params)` and stores a
JSON-serialisable return value as `output/result.json` unless the task wrote
that file itself. An exception prints its traceback (to logs/exec.log) and
exits 1, which the daemon reports as E_EXIT. Standard library only.
"""

import importlib
import json
import os
import sys
import traceback


def main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    paths = [os.path.realpath(p) for p in spec["paths"]]
    sys.path[:0] = paths
    try:
        module = importlib.import_module(spec["task"])
    except Exception:
        traceback.print_exc()
        return 2
    origin = os.path.realpath(getattr(module, "__file__", "") or "")
    if not any(origin.startswith(p + os.sep) for p in paths):
        print(f"task {spec['task']!r} resolved outside the task paths: {origin}", file=sys.stderr)
        return 2
    run = getattr(module, "run", None)
    if not callable(run):
        print(f"task {spec['task']!r} has no callable run()", file=sys.stderr)
        return 2
    try:
        result = run(**spec["params"])
    except Exception:
        traceback.print_exc()
        return 1
    target = os.path.join(spec["output_dir"], "result.json")
    if result is not None and not os.path.lexists(target):
        try:
            payload = json.dumps(result)
        except (TypeError, ValueError) as exc:
            print(f"return value not stored: not JSON-serialisable ({exc})", file=sys.stderr)
        else:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
