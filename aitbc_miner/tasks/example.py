"""Example task: hash and transform an input file, report progress, write artifacts.

Called as `run(**params)` in a child process whose working directory is the
job's `work/`; inputs are reachable by their bare names and artifacts go to
`$AITBC_OUTPUT_DIR`. Params:
  input: name of an input file (default "input.txt")
  transform: "upper" | "lower" | "reverse-lines" (default "upper")
  output: artifact file name (default "transformed.txt")
"""

import hashlib
import os

_TRANSFORMS = {
    "upper": lambda text: text.upper(),
    "lower": lambda text: text.lower(),
    "reverse-lines": lambda text: "\n".join(reversed(text.splitlines())) + "\n",
}


def run(input="input.txt", transform="upper", output="transformed.txt"):
    if transform not in _TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; use one of {sorted(_TRANSFORMS)}")
    with open(input, "rb") as fh:
        data = fh.read()
    print("AITBC_PROGRESS 50 read input", flush=True)
    result = _TRANSFORMS[transform](data.decode("utf-8"))
    out_dir = os.environ["AITBC_OUTPUT_DIR"]
    with open(os.path.join(out_dir, output), "w", encoding="utf-8") as fh:
        fh.write(result)
    print("AITBC_PROGRESS 100 done", flush=True)
    return {
        "input_sha256": hashlib.sha256(data).hexdigest(),
        "input_bytes": len(data),
        "lines": data.count(b"\n"),
        "transform": transform,
        "output": output,
    }
