"""A torchrun worker for tests/test_distributed.py: records its pid, then waits to be stopped."""

import os
import sys
import time

with open(os.path.join(sys.argv[1], f"worker-{os.environ['LOCAL_RANK']}.pid"), "w") as handle:
    handle.write(str(os.getpid()))
time.sleep(120)
