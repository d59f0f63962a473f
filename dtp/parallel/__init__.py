"""Layer-parallel feedback training under torchrun (docs/design.md §10): placement and communication only.

    planning.py  which rank trains which part of which block (pure functions)
    costs.py     the start-up measurement the planner works from
    layout.py    joining the group; the Layout value and the process groups it needs
    protocol.py  the per-step leader/worker exchange, described once
    feedback.py  the leader's feedback phase and the worker loop
"""
