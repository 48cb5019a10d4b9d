"""Deployment: a base model, an adapter or a bank center exported as a MONAI Bundle."""
