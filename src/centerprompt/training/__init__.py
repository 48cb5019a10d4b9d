"""Training: the one loop that pretraining, adaptation and federated sites share, where it runs
(devices, processes, memory), the run configurations and the presets."""
