"""Self-configuration as nnU-Net does it (Isensee et al. 2021): fingerprint → plan → preprocess (and its inverse).

Modules, one concept each:

- :mod:`~medseg.preprocessing.fingerprint`: per-case geometry and foreground intensity statistics (``fingerprint.json``);
- :mod:`~medseg.preprocessing.planner`: target spacing, configurations (2d, 3d_fullres, 3d_lowres), patch, batch and
  network under a device budget, normalisation per channel (``plans.json``);
- :mod:`~medseg.preprocessing.cropping`: the nonzero mask and its bounding box;
- :mod:`~medseg.preprocessing.normalization`: the per-channel intensity schemes;
- :mod:`~medseg.preprocessing.resampling`: images, segmentations and probabilities between spacings ("separate z");
- :mod:`~medseg.preprocessing.locations`: foreground voxel locations per class for the patch sampler;
- :mod:`~medseg.preprocessing.preprocess`: one case, and the whole stage (cases in parallel);
- :mod:`~medseg.preprocessing.inversion`: predictions back to the original grid and affine;
- :mod:`~medseg.preprocessing.parallel`: cases in worker processes with a progress bar.
"""
