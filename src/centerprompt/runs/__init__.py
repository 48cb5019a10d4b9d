"""The jobs a user runs, one module each (pretrain, adapt, predict, score), over what they share: the
base model (base), the cases and split (selection) and the run folder (folder)."""
