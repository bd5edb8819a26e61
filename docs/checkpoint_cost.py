"""What checksums and fsync cost a checkpoint: the checkpoint layer against a bare Orbax save, side by side.

    python docs/checkpoint_cost.py --model resnet18 --input 32x32x3 --rounds 3

"bare" is what cnncli did before its checkpoints were checked: Orbax's StandardCheckpointer writing the
state tree, no fsync, no checksums, and a plain restore. "checked" is cnncli.run.checkpoint: save (fsync
and SHA256SUMS of every file before the rename, the index written atomically) and find + restore
(every file's checksum verified first). Both write the same TrainState (Adam), alternately, into the
same file system; the table gives the median seconds of each and their ratio (docs/reliability.md).
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--input", default="32x32x3")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    import orbax.checkpoint as ocp
    from flax import nnx

    from cnncli.models import build_model
    from cnncli.recipe import ModelConfig, OptimConfig, ScheduleConfig
    from cnncli.run import checkpoint
    from cnncli.train import optim
    from cnncli.train.state import Model, TrainState, init_totals, split_model

    shape = tuple(int(v) for v in args.input.split("x"))
    net = build_model(ModelConfig(name=args.model), input_shape=shape, num_classes=args.classes, seed=0)
    model = Model(*split_model(net))
    lr = optim.learning_rate(OptimConfig(name="adam"), ScheduleConfig(), epochs=1, steps_per_epoch=1)
    tx = optim.build_optimizer(OptimConfig(name="adam"), lr, model.params)
    state = TrainState(model.params, model.rest, tx.init(model.params), jnp.zeros((), jnp.int32))
    totals = init_totals()
    tree = jax.device_get(checkpoint._saveable({  # the tree the bare save writes, as the old layout did
        "params": nnx.to_pure_dict(state.params), "rest": nnx.to_pure_dict(state.rest),
        "opt_state": jax.tree.leaves(state.opt_state), "step": state.step, "totals": totals}))
    size = sum(x.nbytes for x in jax.tree.leaves(tree))

    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_cost_"))
    times = {"bare save": [], "checked save": [], "bare restore": [], "checked restore": []}
    for r in range(args.rounds):
        bare, checked = root / f"bare{r}", root / f"run{r}" / "checkpoints"
        t = time.perf_counter()
        saver = ocp.StandardCheckpointer()
        saver.save(bare.absolute(), tree)
        saver.wait_until_finished()
        saver.close()
        times["bare save"].append(time.perf_counter() - t)
        t = time.perf_counter()
        checkpoint.save(checked, state=state, totals=totals, best=True,
                        meta={"epoch": 1, "step_in_epoch": 0, "global_step": 1, "best": {}})
        times["checked save"].append(time.perf_counter() - t)
        t = time.perf_counter()
        reader = ocp.StandardCheckpointer()
        reader.restore(bare.absolute(), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree))
        reader.close()
        times["bare restore"].append(time.perf_counter() - t)
        t = time.perf_counter()
        found, _ = checkpoint.find(checked.parent, "latest")
        checkpoint.restore(found, state)
        times["checked restore"].append(time.perf_counter() - t)
        shutil.rmtree(bare)
        shutil.rmtree(checked.parent)
    if args.dir is None:
        shutil.rmtree(root)
    print(f"{args.model} {args.input}, Adam: {size / 2**20:.0f} MiB of arrays, {args.rounds} rounds (median s)")
    med = {k: statistics.median(v) for k, v in times.items()}
    for what in ("save", "restore"):
        print(f"{what:8s} bare {med['bare ' + what]:.2f}  checked {med['checked ' + what]:.2f}  "
              f"ratio {med['checked ' + what] / med['bare ' + what]:.2f}")


if __name__ == "__main__":
    main()
