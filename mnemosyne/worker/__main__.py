import os
import sys

from mnemosyne.worker.main import main

code = main()
sys.stdout.flush()
sys.stderr.flush()
# Skip interpreter teardown: NCCL / gloo threads of a failed peer must not hang the exit.
os._exit(code)
