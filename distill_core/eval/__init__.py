"""Evaluation of samplers and students: fidelity to the teacher's reference solve (PSNR, RMSE),
Frechet distance and class accuracy in the metric classifier's feature space, improved precision and
recall there, NFE counting, and the peak memory of a training run."""
