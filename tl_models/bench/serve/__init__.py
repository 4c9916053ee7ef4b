"""`tl-models bench serve`: what serving costs on top of the model, for one build, every stack in one run.

In process (the ceiling): ONNX Runtime on the build's fused graph (backbone + head, the nodes the servers run)
and PyTorch eager, at batch 1, 8 and 32. Over loopback (:mod:`tl_models.bench.loadgen`): the BentoML service
(``POST /classify``) and the Triton router over HTTP and gRPC, at client concurrency 1, 8 and 32. Then the
cost of heads: RSS of the BentoML server's process tree and its p50 with 1 head and with N heads on one
backbone, and a live head swap (``/admin/load``) under load. Servers are started and stopped here unless
their URLs are given. With ``int8``, ONNX Runtime and the servers started here run again on the build's int8
backbone (stacks suffixed ``-int8``; each compared with int8 ONNX Runtime). With ``judging``, the cost of judging
heads: BentoML throughput at the top concurrency without and with one shadow head and 10 % of requests in the
embedding log (two services, measured in turns). With ``processes``, the BentoML service and Triton's router
started here run that many workers / instances. With ``rounds`` above 1, the in-process points and the servers'
points are measured that many times in turn (the servers restarted each round) and each server point is compared
with its own round's ONNX Runtime: on a shared host whose speed drifts by a fifth within minutes, a target is
judged on the median of the rounds' ratios, not on one point. Figures: a table, JSON (``json_path``) and a PNG
(``plot_path``).
"""

from .options import STACKS, BenchServeError, ServeBenchOptions
from .run import bench_serve

__all__ = ["STACKS", "BenchServeError", "ServeBenchOptions", "bench_serve"]
