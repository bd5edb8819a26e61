"""Training: the state a run holds, the jitted steps, the loop, optimizers and schedules, the toolbox
(EMA, mixed precision, class weights, TTA), evaluation, and opening a trained run."""
