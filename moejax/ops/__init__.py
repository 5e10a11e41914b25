"""Pure array operations under the engines: expert FFN math, grouped
matmuls, gathers with gather backwards. No modules, meshes or kernels."""
