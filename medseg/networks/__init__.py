"""Networks, shared by training and inference: the plan's U-Net family (:mod:`medseg.networks.unet`) and the
registry of every network by name (:mod:`medseg.networks.registry`).

Inference rebuilds a model package's network from the topology it stores (``build_network``), so it never
needs the training code; training builds the same networks from the plan.
"""

from medseg.networks.registry import NETWORKS, NetworkSpec, build_network, build_network_by_name, n_parameters, network_topology
from medseg.networks.unet import count_parameters, estimate_training_memory_gib

__all__ = ["NETWORKS", "NetworkSpec", "build_network", "build_network_by_name", "count_parameters", "estimate_training_memory_gib",
           "n_parameters", "network_topology"]
