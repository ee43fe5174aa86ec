"""lit-moe: Mixture-of-Experts Transformer LMs trained with PyTorch Lightning."""
