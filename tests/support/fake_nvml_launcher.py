"""Run the real miner CLI with the fake NVML in place of pynvml (tests only).

    AITBC_TEST_FAKE_NVML=/path/scenario.json python -m tests.support.fake_nvml_launcher run ...

Nothing in the daemon knows about this: the fake is installed as
`sys.modules["pynvml"]` before `aitbc_miner` imports it, and the scenario file
may be rewritten while the miner runs (see fake_nvml.write_scenario).
"""

from __future__ import annotations

import os
import sys

from tests.support.fake_nvml import FakeNvml

SCENARIO_ENV = "AITBC_TEST_FAKE_NVML"


def main() -> int:
    sys.modules["pynvml"] = FakeNvml.from_file(os.environ[SCENARIO_ENV])  # type: ignore[assignment]
    from aitbc_miner.__main__ import main as miner_main

    return miner_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
