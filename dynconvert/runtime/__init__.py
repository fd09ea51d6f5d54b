"""The runtime of a converted model: what runs in its forward pass.

- ``dynamic.py``: the routed Linear / Conv modules and the MLP runtime; ``attention.py``,
  ``conv.py`` and ``shared_out.py``: the attention, convolutional-MLP and shared out-projection
  sites.
- ``bank.py``: the routers of a model and the routing state of one call; ``routers.py``: the
  router modules; ``routing.py``: the modes (train, eval, full) and execution paths.
- ``state.py``: is a model converted, and its bank; ``slices.py``: the weight-slice cache;
  ``checkpointing.py``: gradient checkpointing that routes a recomputed block as the first time.
- ``planned/``: static-shape execution per timestep pattern and its CUDA graphs.
- ``synthetic.py``: routing set by hand (benchmarks and tests).
"""
