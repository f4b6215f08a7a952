"""Where the time of one long prefill goes (dummy Param2-17B shapes, one GPU): the step time of a
1,024-token prompt, cold and warm, and the top kernels of a warm step from torch.profiler."""

import time

import torch

from param2moe.engine import EngineConfig, LLMEngine, SamplingParams

engine = LLMEngine(EngineConfig(load_format="dummy", preset="param2-17b", max_model_len=4096, max_num_seqs=64,
                                enable_prefix_caching=False))
params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)


def one(i: int) -> float:
    engine.add_request(f"p{i}", torch.randint(100, 100000, (1024,)).tolist(), params)
    torch.cuda.synchronize()
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return (time.perf_counter() - t) * 1e3


print("1024-token prefill + first token, ms:", [round(one(i), 1) for i in range(4)])
activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=activities) as prof:
    one(99)
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))
