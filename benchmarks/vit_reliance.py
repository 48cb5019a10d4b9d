"""How much does a trained base model's output depend on its ViT tokens, and on prompt values?

Prompts act only through the transformer's attention. If the decoder segments from its
convolutional skip path alone, prompts have nothing to steer. This measures, on real
preprocessed test windows of the synthetic data: the logit change and the voxels whose label
changes when (a) unit-variance noise is added to every patch token after the patch embedding,
(b) the deep prompts' values are replaced by other random ones (both against the same model).

    python benchmarks/vit_reliance.py BASE.safetensors [--data data/synth] [--cases 6]
"""

from __future__ import annotations

import argparse
import json

import torch

from centerprompt.artifacts import load_model
from centerprompt.data.hecktor import find_cases
from centerprompt.jobs import Scorer, base_preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--cases", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = find_cases(args.data)[:: max(1, len(find_cases(args.data)) // args.cases)][: args.cases]
    scorer = Scorer(cases, base_preprocess(args.base), score_at="preprocessed")
    roi = scorer.preprocess.roi_size
    plain = load_model(args.base).eval()
    prompted = load_model(args.base, prompt_mode="deep", num_prompts=10).eval()
    rows = []
    with torch.no_grad():
        for i, case in enumerate(cases):
            image = scorer.dataset[i]["image"].as_tensor()[None]
            start = [(s - r) // 2 for s, r in zip(image.shape[2:], roi)]
            x = image[:, :, start[0] : start[0] + roi[0], start[1] : start[1] + roi[1], start[2] : start[2] + roi[2]]
            ref = plain(x)
            hook = plain.vit.patch_embedding.register_forward_hook(lambda m, a, out: out + torch.randn_like(out))
            noisy = plain(x)
            hook.remove()
            p1 = prompted(x)
            p2 = prompted(x, prompts=torch.randn_like(prompted.prompts.tokens) * prompted.prompts.tokens.std())
            rows.append({
                "case": case.case_id,
                "token_noise_max_logit_change": float((ref - noisy).abs().max()),
                "token_noise_changed_voxels": int((ref.argmax(1) != noisy.argmax(1)).sum()),
                "prompt_swap_max_logit_change": float((p1 - p2).abs().max()),
                "prompt_swap_changed_voxels": int((p1.argmax(1) != p2.argmax(1)).sum()),
                "foreground_voxels": int((ref.argmax(1) > 0).sum()),
                "max_abs_logit": float(ref.abs().max()),
            })  # fmt: skip
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
