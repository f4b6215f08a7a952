from .parallel import LocalWorkers, PlanComm, exit_with_parent, init_rank

__all__ = ["LocalWorkers", "PlanComm", "exit_with_parent", "init_rank"]
