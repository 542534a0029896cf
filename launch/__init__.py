"""`python -m launch`: run the trainer under torchrun on one node, several nodes, or as a Slurm job."""
