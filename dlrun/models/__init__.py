"""Models: `configs/model/<name>.yaml` is `dlrun/models/<name>.py`, whose
`build(cfg, facts) -> nn.Module` makes the network from the data's facts. The contract
(optional `reset_state`, `feed`, `RULES`) is in `dlrun/family.py`.
"""
