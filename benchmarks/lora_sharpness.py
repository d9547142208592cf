"""How sharp can a LoRA adapter make a reply? LoRA on the linear layers, LoRA that also adapts
the LM head, and full fine-tuning.

A LoRA adapter on the attention/MLP projections leaves the final RMSNorm and the output head
frozen, so it cannot scale the logits: the margin between the best and the second token is
bounded, and so is the probability of the best reply. Full fine-tuning grows the norm's weight
and the head's rows and has no such ceiling; nor has an adapter on ``lm_head`` (the arm
"LoRA r8 + lm_head"; the train engines' log-prob path takes it, ``trainers/lm_head.py``). This
fits a fixed map (10 random prompts -> one of 4 item tokens, as Signaling's listener must) by
SFT with each and prints, every 100 steps, the mean / min probability of the target, the
entropy and the top-1 / top-2 logit margin.

Measured (2-core CPU, ~30 s a run), 300 steps, p(target) mean: on a seed-0 warm-started shared
base of ``lora_per_role.yaml``, LoRA r8 0.9578 = r64 0.9578 (flat from step 100, margin 4.40),
full FT 0.9993 (margin 8.36), LoRA r8 + lm_head 1.0000 at step 100 (1 - p = 1.3e-5 at 300,
margin 12.0); on ``tiny:xs`` as built, LoRA r8/r64 stay at 0.011, full FT 0.9954, LoRA r8 +
lm_head 0.9995 at step 100 and 0.9999 at 300.

    python benchmarks/lora_sharpness.py [--base checkpoints/base/base.pt] [--steps 300]

``--base`` loads a warm-started shared base (``run_dir/checkpoints/base/<base>.pt`` of an
adapter-policy run, e.g. ``examples/signaling/lora_per_role.yaml``); default: ``tiny:xs``
as built (untied, as the trainer unties a shared base).
"""

from __future__ import annotations

import argparse
import copy

import torch

from areal_agents.models import tiny
from areal_agents.trainers.lora_policies import untie_embeddings

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fit(model: torch.nn.Module, prompts: torch.Tensor, targets: torch.Tensor, lr: float,
        steps: int, label: str) -> dict[str, float]:
    """SFT ``model``'s next token after each prompt to its target; prints and returns the last
    report (``p_mean``, ``p_min``, ``entropy``, ``margin``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rows = torch.arange(len(targets))
    report: dict[str, float] = {}
    for step in range(steps + 1):
        logits = model(input_ids=prompts).logits[:, -1, :].float()
        logp = torch.log_softmax(logits, -1)
        if step % 100 == 0 or step == steps:
            p, top = logp.detach().exp(), logits.detach().topk(2, -1).values
            report = {"p_mean": float(p[rows, targets].mean()),
                      "p_min": float(p[rows, targets].min()),
                      "entropy": float(-(p * p.log()).sum(-1).mean()),
                      "margin": float((top[:, 0] - top[:, 1]).mean())}
            print(f"{label:>17} step {step:4d}: p(target) mean {report['p_mean']:.4f} min "
                  f"{report['p_min']:.4f}  entropy {report['entropy']:.3f}  top-1 / top-2 "
                  f"logit margin {report['margin']:.2f}", flush=True)
        if step < steps:
            optimizer.zero_grad()
            (-logp[rows, targets].mean()).backward()
            optimizer.step()
    return report


def main() -> None:
    from peft import LoraConfig, get_peft_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="a warm-started shared base (.pt state dict)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tokenizer = tiny("xs", seed=0)
    untie_embeddings(model)
    if args.base:
        model.load_state_dict(torch.load(args.base, weights_only=True), strict=False)
    items = [tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    prompts = torch.randint(5, 200, (10, 24), generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([items[i % 4] for i in range(10)])
    results = {}
    arms = {"LoRA r8": (8, TARGETS), "LoRA r64": (64, TARGETS),
            "LoRA r8 + lm_head": (8, [*TARGETS, "lm_head"])}
    for label, (rank, targets_of) in arms.items():
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets_of)
        results[label] = fit(get_peft_model(copy.deepcopy(model), lora), prompts, targets,
                             7e-3, args.steps, label)
    results["full FT"] = fit(copy.deepcopy(model), prompts, targets, 1e-3, args.steps,
                             "full FT")
    lora, head, full = (results[k] for k in ("LoRA r8", "LoRA r8 + lm_head", "full FT"))
    print(f"\nafter {args.steps} steps: 1 - p(target) LoRA r8 {1 - lora['p_mean']:.2e} vs full "
          f"FT {1 - full['p_mean']:.2e} ({(1 - lora['p_mean']) / (1 - full['p_mean']):.1f}x "
          "the error; the adapters on the linear layers cannot scale the logits, final norm and "
          f"head frozen) vs LoRA r8 + lm_head {1 - head['p_mean']:.2e} "
          f"({(1 - head['p_mean']) / (1 - full['p_mean']):.3f}x; an adapter on the head can)")


if __name__ == "__main__":
    main()
