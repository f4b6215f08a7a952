from .parallel import LocalWorkers, PlanComm, exit_with_parent, init_rank
from .watch import RankLostError, stop_peer_watch

__all__ = ["LocalWorkers", "PlanComm", "RankLostError", "exit_with_parent", "init_rank", "stop_peer_watch"]
