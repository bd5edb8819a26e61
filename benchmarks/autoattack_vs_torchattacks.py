#!/usr/bin/env python3
"""cnncli's attacks against torchattacks 3.5 on the same weights and the same test images.

The run's model (lenet5 or a CIFAR resnetN) is rebuilt in PyTorch from cnncli's weights
(tests/torch_models.py, logits checked equal), and both frameworks attack the first N test images:

    apgd-ce     APGD, cross-entropy, 1 restart, 100 steps
    apgd-t      APGD-T, targeted DLR over the top 9 classes, 100 steps each
    fab-t       FAB-T over the top 9 classes, 100 steps each
    square      Square, 5000 queries (the schedule without rescaling, as AutoAttack runs it)
    autoattack  the standard version with the reference's settings (the four above in sequence, each on the
                points still robust; torchattacks: MultiAttack of the same four)
    autoattack-shipped   torchattacks.AutoAttack as it ships (its attacks keep their default 10 steps)
    pgd20       PGD-20, step 0.01, random start

Every line printed is one JSON object: framework, attack, robust accuracy, seconds, the largest
perturbation and the pixel range of the adversarial images. The last line, with `img_per_s`
(images / seconds of the last attack), is what benchmarks/side_by_side.py reads:

    python benchmarks/side_by_side.py --rounds 3 \\
      --a "python benchmarks/autoattack_vs_torchattacks.py RUN --framework cnncli --attacks autoattack" \\
      --b "python benchmarks/autoattack_vs_torchattacks.py RUN --framework torchattacks --attacks autoattack"
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "autoattack", "autoattack-shipped", "pgd20")
STEPS, TARGETS, QUERIES = 100, 9, 5000
PGD_STEPS, PGD_STEP = 20, 0.01


def cnncli_configs(name: str, norm: str):
    from cnncli.adversarial.attacks import AttackConfig
    from cnncli.adversarial.autoattack import version_attacks

    if name == "autoattack":
        return version_attacks("standard", norm)
    if name == "pgd20":
        return [AttackConfig("pgd", norm=norm, steps=PGD_STEPS, step_size=PGD_STEP)]
    return [AttackConfig(name, norm=norm, steps=STEPS, targets=TARGETS, queries=QUERIES)]


def run_cnncli(trained, x, y, names, name, eps, norm, batch, seed):
    from cnncli.adversarial.autoattack import autoattack
    from cnncli.train.steps import data_mesh

    start = time.perf_counter()
    out = autoattack(trained.model, x, y, names, [eps], configs=cnncli_configs(name, norm), version="custom",
                     norm=norm, batch_size=batch, mesh=data_mesh(), seed=seed)
    seconds = time.perf_counter() - start
    row, adv = out["rows"][0], out["examples"][0]
    return {"robust_accuracy": row["robust_accuracy"], "seconds": seconds, "max_linf": row["max_linf"],
            "max_l2": row["max_l2"], "min_pixel": row["min_pixel"], "max_pixel": row["max_pixel"],
            "stages": [{k: s[k] for k in ("attack", "robust_accuracy", "seconds")} for s in row["stages"]],
            "warnings": out["warnings"]}, adv["x_adv"]


def torch_attack(model, name, eps, norm, classes, seed):
    import torchattacks as ta

    norm_name = {"linf": "Linf", "l2": "L2"}[norm]
    apgd = ta.APGD(model, norm=norm_name, eps=eps, steps=STEPS, n_restarts=1, loss="ce", seed=seed)
    apgdt = ta.APGDT(model, norm=norm_name, eps=eps, steps=STEPS, n_restarts=1, n_classes=classes, seed=seed)
    fabt = ta.FAB(model, norm=norm_name, eps=eps, steps=STEPS, n_restarts=1, multi_targeted=True, n_classes=classes,
                  seed=seed)
    square = ta.Square(model, norm=norm_name, eps=eps, n_queries=QUERIES, n_restarts=1, resc_schedule=False,
                       seed=seed)
    return {"apgd-ce": apgd, "apgd-t": apgdt, "fab-t": fabt, "square": square,
            "autoattack": ta.MultiAttack([apgd, apgdt, fabt, square]),
            "autoattack-shipped": ta.AutoAttack(model, norm=norm_name, eps=eps, version="standard", n_classes=classes,
                                                seed=seed),
            "pgd20": ta.PGD(model, eps=eps, alpha=PGD_STEP, steps=PGD_STEPS, random_start=True)}[name]


def run_torch(model, x, y, name, eps, norm, classes, batch, seed):
    import torch

    torch.manual_seed(seed)
    attack = torch_attack(model, name, eps, norm, classes, seed)
    xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y.astype(np.int64))
    start = time.perf_counter()
    advs = [attack(xt[i:i + batch], yt[i:i + batch]) for i in range(0, len(x), batch)]
    seconds = time.perf_counter() - start
    adv = torch.cat(advs).detach()
    with torch.no_grad():
        correct = (model(adv).argmax(1) == yt).float().mean().item()
    delta = (adv - xt).reshape(len(x), -1)
    return {"robust_accuracy": correct, "seconds": seconds, "max_linf": delta.abs().max().item(),
            "max_l2": delta.norm(dim=1).max().item(), "min_pixel": adv.min().item(),
            "max_pixel": adv.max().item()}, adv.numpy().transpose(0, 2, 3, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a cnncli run of lenet5 or a CIFAR resnetN")
    p.add_argument("--n", type=int, default=1000, help="the first N test images")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--norm", default="linf", choices=("linf", "l2"))
    p.add_argument("--framework", default="both", choices=("both", "cnncli", "torchattacks"))
    p.add_argument("--attacks", default="apgd-ce,apgd-t,autoattack,pgd20")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default="best")
    args = p.parse_args()
    names = args.attacks.split(",")
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        sys.exit(f"unknown attacks {unknown}; choose from {', '.join(ATTACKS)}")

    from cnncli.train.trained_run import eval_data, load_trained

    trained = load_trained(args.run, args.checkpoint)
    x_uint8, y, class_names = eval_data(trained, "test")
    x_uint8, y = x_uint8[:args.n], y[:args.n]
    x = x_uint8.astype(np.float32) / 255.0
    arch = trained.recipe.model.name
    model = None
    if args.framework != "cnncli":
        import torch

        from tests.torch_models import from_cnncli

        model = from_cnncli(trained.model, arch, trained.image_shape, len(class_names))
        from cnncli.train.steps import forward

        ours = np.asarray(forward(trained.model.eval_def, trained.model.params, trained.model.rest, x[:64])[0])
        with torch.no_grad():
            theirs = model(torch.from_numpy(x[:64].transpose(0, 3, 1, 2).copy())).numpy()
        gap = float(np.abs(ours - theirs).max())
        if gap > 1e-3 * max(1.0, float(np.abs(ours).max())):
            sys.exit(f"the torch twin's logits differ from cnncli's by {gap}")
        print(json.dumps({"twin_logit_gap": gap, "arch": arch, "n": len(y)}), flush=True)
    frameworks = ["cnncli", "torchattacks"] if args.framework == "both" else [args.framework]
    last = None
    for name in names:
        for framework in frameworks:
            if framework == "cnncli":
                if name == "autoattack-shipped":
                    continue
                result, _ = run_cnncli(trained, x_uint8, y, class_names, name, args.eps, args.norm, args.batch,
                                       args.seed)
            else:
                result, _ = run_torch(model, x, y, name, args.eps, args.norm, len(class_names), args.batch,
                                      args.seed)
            last = {"framework": framework, "attack": name, "eps": args.eps, "norm": args.norm, "n": len(y),
                    **result, "img_per_s": len(y) / result["seconds"]}
            print(json.dumps(last), flush=True)


if __name__ == "__main__":
    main()
