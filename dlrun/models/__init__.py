"""Models: `configs/model/<name>.yaml` is `dlrun/models/<name>.py`, whose
`build(cfg, facts) -> nn.Module` makes the network from the data's facts. Optional hooks
(`reset_state`, `feed`, `carried_state` / `load_carried_state`) and `RULES` are described
with the rest of the contract in `dlrun/family.py`.
"""
