"""Evaluation of samplers and students: fidelity to the teacher's reference solve (PSNR, RMSE),
Frechet distance and class accuracy in the metric classifier's feature space, and NFE counting."""
