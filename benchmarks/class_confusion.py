"""Where each tumour class's voxels go: for every model given, the share of the primary tumour's
(GTVp) and the lymph nodes' (GTVn) voxels it labels background, GTVp and GTVn, and its mean
probability of the right class inside them, on the old centers' validation cases (the split of
``--data``; preprocessed grid, sliding window as validation runs it).

A DSCagg says that a class is missed, not what it was taken for: this tells a model that never
learned the primary tumour (its voxels go to background) from one that calls nodes primary tumour.
Models are ``model.safetensors`` files or a federated run's round checkpoints (``last_round.pt``,
``best_round.pt``: the global tensors of that round, on the preset's pretraining model).

    python benchmarks/class_confusion.py runs/demo/full/pretrain/model.safetensors runs/fed/last_round.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from centerprompt.artifacts import build_adapted_model
from centerprompt.evaluate import sliding_window_predict
from centerprompt.federated.site import FederatedJob, job_model
from centerprompt.runs.selection import load_index
from centerprompt.scoring import Scorer
from centerprompt.weights import load_weights_only

CLASSES = ("background", "GTVp", "GTVn")


def load(path: Path, preset: str) -> torch.nn.Module:
    if path.suffix == ".safetensors":
        return build_adapted_model(path).eval()
    saved = load_weights_only(path)
    # last_round.pt names its job; best_round.pt holds tensors only, of the preset's model
    job = FederatedJob.from_config(json.loads(saved["job"])) if "job" in saved else FederatedJob(preset=preset)
    model, _, _ = job_model(job)
    tensors = saved["tensors"]
    if set(tensors) != {n for n, p in model.named_parameters() if p.requires_grad}:
        raise ValueError(f"{path}: its tensors are not the {job.preset} preset's pretraining model's.")
    model.load_state_dict(tensors, strict=False)
    return model.eval()


def confusion(model: torch.nn.Module, scorer: Scorer) -> dict[str, dict[str, float]]:
    """Per tumour class: the share of its voxels given each label, and the mean probability of its own."""
    counts, inside, voxels = torch.zeros(3, 3), torch.zeros(3), torch.zeros(3)
    with torch.no_grad():
        for i in range(len(scorer.cases)):
            probs = sliding_window_predict(model, scorer.image(i), scorer.preprocess.roi_size, 1)[0]
            label = scorer.dataset[i]["label"][0].as_tensor().round().long()
            pred = probs.argmax(0)
            for c in (1, 2):
                where = label == c
                counts[c] += torch.bincount(pred[where], minlength=3)[:3].float()
                inside[c] += probs[c][where].sum()
                voxels[c] += where.sum()
    return {CLASSES[c]: {**{f"as {CLASSES[k]}": float(counts[c, k] / counts[c].sum()) for k in range(3)},
                         "mean probability": float(inside[c] / voxels[c])} for c in (1, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/synth"))
    parser.add_argument("--exclude-center", default="MDA", help="the new center, not scored")
    parser.add_argument("--preset", default="cpu", help="the preset a round checkpoint's model was built with")
    parser.add_argument("--seed", type=int, default=0, help="the split's seed when the folder has no splits.json")
    args = parser.parse_args()
    cases, splits = load_index(args.data, seed=args.seed)
    val = [cases[i] for center, split in sorted(splits.items()) if center != args.exclude_center for i in split["val"]]
    scorer = Scorer(val, job_model(FederatedJob(preset=args.preset))[1], score_at="preprocessed")
    print(json.dumps({str(p): confusion(load(p, args.preset), scorer) for p in args.models}, indent=1))


if __name__ == "__main__":
    main()
