"""The runtime of a converted model: what runs in its forward pass.

- ``dynamic.py``: the routed Linear / Conv modules and what every site runtime shares;
  ``attention.py``, ``mlp.py``, ``conv.py`` and ``shared_out.py``: the attention, MLP,
  convolutional-MLP and shared out-projection sites; ``interfaces.py``: what they hand each
  other (decisions, the MLP call) and what they ask of the bank (Protocols).
- ``bank.py``: the routers of a model and the routing state of one call; ``routers.py``: the
  router modules; ``routing.py``: the routing modes (train, eval, full); ``modes.py``: the
  registered execution modes (fast, masked, planned, auto).
- ``state.py``: is a model converted, and its bank; ``slices.py``: the weight-slice cache;
  ``checkpointing.py``: gradient checkpointing that routes a recomputed block as the first time.
- ``planned/``: static-shape execution per timestep pattern and its CUDA graphs.
- ``synthetic.py``: routing set by hand (benchmarks and tests).
"""
