"""`python -m param2moe.engine RANK CONFIG_JSON`: a worker rank, started by the driver (distributed.LocalWorkers)."""

import sys

from .worker import worker_main

worker_main(sys.argv[1:])
