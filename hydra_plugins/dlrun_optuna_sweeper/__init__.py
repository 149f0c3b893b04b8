"""dlrun's Optuna sweeper, a Hydra plugin: `dlrun train -m hydra/sweeper=optuna ...`.
Hydra finds it in the `hydra_plugins` namespace package (no __init__.py one level up)."""
