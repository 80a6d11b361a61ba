"""What training, serving and model I/O share, below all of them: the mesh and the
logical-axis sharding rules (`lcx.runtime.sharding`), a model's abstract parameters and
their shardings (`lcx.runtime.params`).

Nothing is imported here, so a config file can take `DEFAULT_RULES` from
`lcx.runtime.sharding` without loading the model.
"""
