"""The programmatic expert of the synthetic world: a `Policy` that solves the world's questions
hop by hop through the real agent loop and retrieval server (`policy`), and the command that
turns a split of the world into scored trajectories for `asearcher sft` (`trajectories`).

It sits above `world` (whose language it parses) and `agent` (whose loop it plugs into), so the
world stays a data generator that imports neither.
"""
