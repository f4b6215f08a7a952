from .parallel import ParallelConfig, PlanComm, init_rank, start_local_workers

__all__ = ["ParallelConfig", "PlanComm", "init_rank", "start_local_workers"]
