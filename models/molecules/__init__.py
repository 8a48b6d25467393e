"""Molecule generation: an E(3)-equivariant GNN (EGNN with attention), the multimodal flow over
coordinates and atom types (TFG-Flow), its Euler sampler and training-free property guidance."""
