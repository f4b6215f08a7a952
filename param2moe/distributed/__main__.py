"""`python -m param2moe.distributed RANK CONFIG_JSON`: a worker rank started by the driver."""

import sys

from .parallel import main

main(sys.argv[1:])
