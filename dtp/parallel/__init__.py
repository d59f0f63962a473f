"""Layer-parallel feedback training under torchrun (docs/design.md §10): placement and communication only.

    planning.py  which rank trains which part of which block (pure functions)
    costs.py     the start-up measurement the planner works from
    placement.py which device and backend each rank of a node uses (pure functions)
    layout.py    joining the group; the Topology and Layout values and the process groups they need
    protocol.py  the per-step leader/worker exchange, described once
    feedback.py  the leader's feedback phase and the worker loop
"""
