"""Generative models for data augmentation: a class-conditional GAN (ACGAN) and the pools it samples.

    recipe   the GAN recipe schema (`cnncli gan train RECIPE`)
    acgan    the generator, the discriminator, the jitted training step, sampling
    run      training into a run directory, loading a trained generator, labelled sample pools

A classifier recipe mixes a GAN's samples into its training batches with `data.generated` (see
`cnncli.train`); the GAN must have been trained on the same data split, or it leaks other images.
"""
